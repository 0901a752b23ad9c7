"""bench/region_transfer.py: the transfer layout, the test figures (coverage, interval width), the cross factor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import region_transfer as rt


def region(root: Path, prefix: str, counts: dict[str, int]) -> Path:
    for side in ("inputs", "labels"):
        for split, n in counts.items():
            (root / side / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                np.save(root / side / split / f"{prefix}{split}{i}.npy", np.zeros((1, 2, 2), np.float32))
    return root


def test_transfer_layout_trains_on_one_region_and_tests_on_every_tile_of_the_other(tmp_path):
    a = region(tmp_path / "a", "tile_a", {"train": 3, "val": 2, "test": 1})
    b = region(tmp_path / "b", "tile_b", {"train": 4, "val": 1, "test": 2})
    flags = rt.transfer_layout(a, b, tmp_path / "ab")
    assert flags == ["--input-dir", str(tmp_path / "ab/inputs"), "--label-dir", str(tmp_path / "ab/labels")]
    for side in ("inputs", "labels"):
        got = {s: sorted(p.name for p in (tmp_path / "ab" / side / s).iterdir()) for s in rt.SPLITS}
        assert got["train"] == [f"tile_atrain{i}.npy" for i in range(3)]
        assert got["val"] == [f"tile_aval{i}.npy" for i in range(2)]
        assert len(got["test"]) == 7 and all(n.startswith("tile_b") for n in got["test"])  # all of B, none of A
        link = tmp_path / "ab" / side / "test" / "tile_bval0.npy"
        assert link.is_symlink() and link.resolve() == (b / side / "val" / "tile_bval0.npy").resolve()
    assert rt.transfer_layout(a, b, tmp_path / "ab") == flags  # a rerun reuses the links


def test_transfer_layout_refuses_a_tile_name_in_both_regions(tmp_path):
    a = region(tmp_path / "a", "tile_", {"train": 2, "val": 1, "test": 1})
    b = region(tmp_path / "b", "tile_", {"train": 2, "val": 1, "test": 1})
    with pytest.raises(SystemExit, match=r"tile_train0.*in both regions"):
        rt.transfer_layout(a, b, tmp_path / "ab")


def fake_run(where: Path, y: np.ndarray, mu: np.ndarray, sd: np.ndarray, scale: float) -> Path:
    where.mkdir(parents=True)
    d = pd.DataFrame({"split": "test", "label": y, "mean": mu, "std": sd * scale, "std_uncalibrated": sd})
    pd.concat([d, d.iloc[:3].assign(split="val", mean=-99.0)]).to_parquet(where / "predictions.parquet")
    (where / "calibration.json").write_text(json.dumps({"scale": scale, "split": "val", "loss": "gaussian_nll"}))
    return where


def test_score_reports_coverage_and_width_and_a_factor_widens_both(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.normal(20, 5, 4000)
    run = fake_run(tmp_path / "run", y, y + rng.normal(1.0, 3.0, y.size), np.full(y.size, 2.0), scale=1.0)
    s = rt.score(run)
    assert s["n"] == 4000 and s["bias"] == pytest.approx(1.0, abs=0.15)  # val rows never counted
    assert s["rmse"] == pytest.approx(np.sqrt(10.0), rel=0.05)
    assert s["width_1sigma"] == pytest.approx(4.0) and s["width_2sigma"] == pytest.approx(8.0)
    assert s["within_1sigma"] < 0.5  # sigma 2 for errors of sd ~3.2: too narrow
    wide = rt.score(run, factor=rt.right_factor(run))
    assert rt.right_factor(run) == pytest.approx(np.sqrt(10.0) / 2.0, rel=0.05)
    assert wide["within_1sigma"] == pytest.approx(0.68, abs=0.03)  # the right factor restores the coverage ...
    assert wide["width_1sigma"] == pytest.approx(4.0 * rt.right_factor(run))  # ... by widening, which shows
    assert wide["raw_within_1sigma"] == s["raw_within_1sigma"]  # the uncalibrated figures ignore the factor


def test_cross_rows_apply_the_factor_right_in_the_other_direction(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for direction, noise in (("A→B", 4.0), ("B→A", 2.0)):
        y = rng.normal(20, 5, 3000)
        run = fake_run(tmp_path / direction, y, y + rng.normal(0, noise, y.size), np.full(y.size, 2.0), scale=1.0)
        rows.append({"direction": direction, "method": "recipe", "seed": 0, "run": str(run)})
        rows[-1]["right_factor"] = rt.right_factor(run)
    rows.append({"direction": "A→B", "method": "rf", "seed": 0, "run": rows[0]["run"]})  # not the recipe: ignored
    cross = {r["direction"]: r for r in rt.cross_rows(rows)}
    assert set(cross) == {"A→B", "B→A"}
    assert cross["B→A"]["factor"] == pytest.approx(2.0, rel=0.05)  # what A→B needed (errors 4 vs sigma 2)
    assert cross["A→B"]["factor"] == pytest.approx(1.0, rel=0.05)
    assert cross["B→A"]["width_1sigma"] == pytest.approx(4.0 * cross["B→A"]["factor"])
    assert cross["B→A"]["within_1sigma"] > 0.9  # over-wide for the easier direction


def test_pooled_layout_keeps_each_regions_split_and_score_gives_each_regions_rmse(tmp_path):
    a = region(tmp_path / "a", "tile_a", {"train": 2, "val": 1, "test": 1})
    b = region(tmp_path / "b", "tile_b", {"train": 3, "val": 1, "test": 2})
    rt.pooled_layout([a, b], tmp_path / "pooled")
    got = {s: sorted(p.stem for p in (tmp_path / "pooled/labels" / s).iterdir()) for s in rt.SPLITS}
    assert got["train"] == ["tile_atrain0", "tile_atrain1", "tile_btrain0", "tile_btrain1", "tile_btrain2"]
    assert got["test"] == ["tile_atest0", "tile_btest0", "tile_btest1"]
    y = np.zeros(6)
    run = fake_run(tmp_path / "run", y, np.array([1.0, 1.0, 3.0, 3.0, 3.0, 3.0]), np.ones(6), scale=1.0)
    d = pd.read_parquet(run / "predictions.parquet")
    d["tile"] = ["tile_atest0"] * 2 + ["tile_btest0"] * 4 + ["tile_atest0"] * 3  # the 3 val rows: not counted
    d.to_parquet(run / "predictions.parquet")
    s = rt.score(run, regions={"A": {"tile_atest0"}, "B": {"tile_btest0", "tile_btest1"}})
    assert (s["rmse_A"], s["rmse_B"]) == (pytest.approx(1.0), pytest.approx(3.0))
    assert s["rmse"] == pytest.approx(np.sqrt((2 + 4 * 9) / 6))
