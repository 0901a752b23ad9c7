"""bench/label_curve.py: the outer folds with their train labels thinned (nested subsets), and the curve's line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import label_curve as lc
import real_selection as rs


def _fold(data: Path) -> dict[str, list[str]]:
    fold = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    for split, names in (("train", ["tile_1_1", "tile_1_2"]), ("val", ["tile_1_3"]), ("test", ["tile_1_4"])):
        for name in names:
            for side in ("inputs", "labels"):
                (data / side / split).mkdir(parents=True, exist_ok=True)
            y = np.where(rng.random((40, 50)) < 0.3, rng.normal(20, 5, (40, 50)), np.nan).astype(np.float32)
            np.save(data / "labels" / split / f"{name}.npy", y)
            np.save(data / "inputs" / split / f"{name}.npy", np.zeros((2, 40, 50), np.float32))
            fold[split].append(name)
    return fold


def test_thinned_train_labels_are_nested_subsets_and_the_rest_is_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fold = _fold(data)
    source = {n: np.load(next(data.glob(f"labels/*/{n}.npy"))) for s in fold.values() for n in s}
    full = sum(int(np.isfinite(source[n]).sum()) for n in fold["train"])
    kept: dict[float, dict[str, np.ndarray]] = {}
    for f in (0.25, 0.5, 1.0):
        ((flags, n),) = lc.fold_folders(data, [fold], f, seed=7, out=tmp_path / "o")
        where = Path(flags[3])
        kept[f] = {p.stem: np.load(p) for p in (where / "train").glob("*.npy")}
        assert n == sum(int(np.isfinite(y).sum()) for y in kept[f].values())
        assert abs(n / full - f) < 0.05
        for name in fold["train"]:  # only labels removed, the rest as in the source
            y = kept[f][name]
            assert np.array_equal(y[np.isfinite(y)], source[name][np.isfinite(y)])
        for split in ("val", "test"):  # untouched: still links to the source
            for name in fold[split]:
                assert (where / split / f"{name}.npy").is_symlink()
    for name in fold["train"]:  # nested: a bigger fraction keeps every label a smaller one kept
        assert not (np.isfinite(kept[0.25][name]) & ~np.isfinite(kept[0.5][name])).any()
        assert np.array_equal(np.isfinite(kept[1.0][name]), np.isfinite(source[name]))
    for name, y in source.items():  # the source never written through a link
        assert np.array_equal(np.load(next(data.glob(f"labels/*/{name}.npy"))), y, equal_nan=True)
    again = lc.fold_folders(data, [fold], 0.5, seed=7, out=tmp_path / "o")  # a rerun does not thin again
    assert again[0][1] == sum(int(np.isfinite(y).sum()) for y in kept[0.5].values())
    assert np.array_equal(np.load(tmp_path / "o/data/f0.5_s7/outer0/labels/train/tile_1_1.npy"),
                          kept[0.5]["tile_1_1"], equal_nan=True)  # fmt: skip
    lc.fold_folders(data, [fold], 0.5, seed=8, out=tmp_path / "o")
    seed8 = np.load(tmp_path / "o/data/f0.5_s8/outer0/labels/train/tile_1_1.npy")
    assert not np.array_equal(np.isfinite(seed8), np.isfinite(kept[0.5]["tile_1_1"]))  # another seed, other labels


def test_share_line_finds_where_the_share_reaches_0_9() -> None:
    labels = [100, 200, 400, 800]
    line = lc.share_line(labels, [1.1 - 0.02 * k for k in range(4)])
    assert line["slope_per_doubling"] == pytest.approx(-0.02)
    assert line["labels_at_0.9"] == pytest.approx(100 * 2**10)
    assert math.isinf(lc.share_line(labels, [1.0, 1.01, 1.0, 1.02])["labels_at_0.9"])  # not falling: never
    assert line["slope_se"] == pytest.approx(0, abs=1e-9)  # an exact line
    noisy = lc.share_line(labels, [1.1, 1.06, 1.08, 1.02])
    assert noisy["slope_se"] > 0 and noisy["labels_at_0.9_steep"] < noisy["labels_at_0.9"]
    assert "slope_se" not in lc.share_line(labels[:3], [1.1, 1.08, 1.06])  # too few points for an error


def test_bad_fractions_and_methods_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, msg in ((["--fractions", "0,1"], "--fractions"), (["--methods", "unet,svm"], "'svm' is not one of")):
        with pytest.raises(SystemExit):
            lc.parse_args([*argv, "--out", "x"])
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_curve_tests_every_label_at_every_fraction(tmp_path: Path, real_data: Path) -> None:
    space = {"fixed": {"batch_size": 4, "base_channels": 4, "depth": 2}, "scheduler": {"max_t": 1}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out, js = tmp_path / "o", tmp_path / "r.json"
    argv = ["--data", str(real_data), "--outer-k", "2", "--seeds", "0", "--fractions", "0.5,1", "--methods",
            "unet,rf", "--space", str(tmp_path / "space.yaml"), "--out", str(out), "--json", str(js)]  # fmt: skip
    lc.main(argv)
    got = json.loads(js.read_text())
    labels = sum(rs.tile_labels(real_data).values())
    assert [r["test_n"] for r in got["rows"]] == [labels] * 4  # every method and fraction tested on every label
    half, full = (s["train_labels_per_fold"] for s in got["summary"][:2])
    assert 0.4 < half / full < 0.6
    assert got["line"] is not None and "slope_per_doubling" in got["line"]
    assert len({r["test_rmse"] for r in got["rows"]}) == 4  # four different fits
    stamp = (out / "runs" / "f0.5" / "outer0" / "unet_s0" / "metrics.json").stat().st_mtime_ns
    lc.main(argv)  # a rerun reads everything back
    assert (out / "runs" / "f0.5" / "outer0" / "unet_s0" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.loads(js.read_text())["rows"] == got["rows"]


def test_label_variogram_bins_pairs_by_distance_and_finds_the_nugget(tmp_path: Path) -> None:
    # Two labels 5 px apart (0 and 4 m): the 4-8 px bin holds one pair, gamma = 4**2 / 2. A pair 2 px apart is below
    # the first edge and left out.
    (tmp_path / "labels" / "train").mkdir(parents=True)
    y = np.full((20, 20), np.nan, np.float32)
    y[0, 0], y[3, 4], y[3, 6] = 0.0, 4.0, 4.0
    np.save(tmp_path / "labels" / "train" / "a.npy", y)
    vg = lc.label_variogram(tmp_path, edges=(4, 8, 16))
    assert [(b["pairs"], b["gamma"]) for b in vg["bins"]] == [(2, 8.0), (0, 0.0)]  # (0,0)-(3,4) and (0,0)-(3,6)
    # Labels with no spatial structure: every bin's gamma is their variance, and the fit puts it in the nugget.
    # Labels on a field of 16 px blocks (sd 5 m) plus noise (sd 2 m): gamma grows with distance, and the nugget
    # stays below the first bin's gamma, the bound the data give without a model.
    (tmp_path / "labels" / "train" / "a.npy").unlink()
    rng = np.random.default_rng(1)
    for kind in ("noise", "field"):
        folder = tmp_path / kind / "labels" / "train"
        folder.mkdir(parents=True)
        for k in range(8):
            field = np.kron(rng.normal(0, 5, (8, 8)), np.ones((16, 16)))
            y = rng.normal(20, 3, (128, 128)) if kind == "noise" else 20 + field + rng.normal(0, 2, (128, 128))
            np.save(folder / f"{k}.npy", np.where(rng.random((128, 128)) < 0.02, y, np.nan).astype(np.float32))
    noise, field = (lc.label_variogram(tmp_path / kind) for kind in ("noise", "field"))
    assert all(abs(b["gamma"] - 9) < 1.2 for b in noise["bins"])
    assert noise["nugget"] > 0.85 * noise["label_var"] and abs(noise["label_var"] - 9) < 1
    gammas = [b["gamma"] for b in field["bins"]]
    assert gammas[0] < gammas[1] < gammas[2] and gammas[-1] > 1.8 * gammas[0]  # flat beyond the 16 px blocks
    assert field["nugget"] <= gammas[0] and field["sill"] == pytest.approx(field["label_var"], rel=0.15)
