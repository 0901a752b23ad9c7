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


def named_region(root: Path, names: dict[str, list[str]]) -> Path:
    for side in ("inputs", "labels"):
        for split, tiles in names.items():
            (root / side / split).mkdir(parents=True, exist_ok=True)
            for n in tiles:
                np.save(root / side / split / f"{n}.npy", np.zeros((1, 2, 2), np.float32))
    return root


def test_pooled_cv_folds_test_every_tile_of_both_regions_once_in_strips(tmp_path):
    grid = [f"tile_{r}_{c}" for r in range(2) for c in range(3)]  # region A: a 2 x 3 grid
    a = named_region(tmp_path / "a", {"train": grid[:4], "val": grid[4:5], "test": grid[5:]})
    ids = [f"tile_b{i}" for i in (8, 9, 10, 11, 100, 101)]  # region B: ids, each tile its own block
    b = named_region(tmp_path / "b", {"train": ids[2:], "val": ids[:1], "test": ids[1:2]})
    folds = rt.pooled_cv_folds({"a": a, "b": b}, 3, 0.15)
    assert len(folds) == 3
    for key, names in (("a", grid), ("b", ids)):
        tested = [n for f in folds for n in f[key]["test"]]
        assert sorted(tested) == sorted(names)  # every tile a test tile exactly once
        for f in folds:
            parts = [set(f[key][s]) for s in rt.SPLITS]
            assert set.union(*parts) == set(names) and sum(map(len, parts)) == len(names)  # disjoint, all used
            assert f[key]["val"]  # each region has val tiles in each fold
    # region A by grid column (then row), region B by the number its name ends with: neighbours stay together
    assert folds[0]["a"]["test"] == ["tile_0_0", "tile_1_0"]
    assert [f["b"]["test"] for f in folds] == [
        ["tile_b8", "tile_b9"],
        ["tile_b10", "tile_b11"],
        ["tile_b100", "tile_b101"],
    ]
    flags = rt.pooled_cv_layout({"a": a, "b": b}, folds[1], tmp_path / "fold1")
    assert flags == ["--input-dir", str(tmp_path / "fold1/inputs"), "--label-dir", str(tmp_path / "fold1/labels")]
    got = sorted(p.stem for p in (tmp_path / "fold1/labels/test").iterdir())
    assert got == sorted(folds[1]["a"]["test"] + folds[1]["b"]["test"])
    with pytest.raises(SystemExit, match="only 6 tiles"):
        rt.pooled_cv_folds({"a": a, "b": b}, 7, 0.15)


def test_score_pools_the_test_rows_of_several_runs(tmp_path):
    y = np.zeros(4)
    one = fake_run(tmp_path / "f0", y, np.ones(4), np.ones(4), scale=1.0)
    two = fake_run(tmp_path / "f1", y, np.full(4, 3.0), np.ones(4), scale=1.0)
    s = rt.score([one, two])
    assert s["n"] == 8 and s["rmse"] == pytest.approx(np.sqrt((4 + 36) / 8)) and s["bias"] == pytest.approx(2.0)
    # the shipped factor of the pooled rows (|r| / sigma = 1, 1, 1, 1, 3, 3, 3, 3): their 68.27 % quantile
    assert rt.right_factor([one, two]) == pytest.approx(np.quantile([1.0] * 4 + [3.0] * 4, 0.6827), rel=0.02)


def test_local_rows_fit_offset_and_scale_on_the_tested_regions_val_tiles_and_score_the_rest(tmp_path):
    regions = {
        "a": named_region(tmp_path / "a", {"val": ["tile_0_0"]}),
        "b": named_region(tmp_path / "b", {"val": ["tile_b1"]}),
    }
    rng = np.random.default_rng(2)
    n = 3000
    y = rng.normal(20, 5, 2 * n)
    mu = y + 4.0 + rng.normal(0, 2.0, 2 * n)  # biased by +4 m on the region it was not trained on
    run = fake_run(tmp_path / "run", y, mu, np.full(2 * n, 1.0), scale=1.0)
    d = pd.read_parquet(run / "predictions.parquet")
    d["tile"] = ["tile_b1"] * n + ["tile_b2"] * n + ["tile_b1"] * 3  # the first half: B's val tile
    d.to_parquet(run / "predictions.parquet")
    rows = [{"direction": "A→B", "method": "recipe", "seed": 0, "run": str(run)},
            {"direction": "pooled", "method": "recipe", "seed": 0, "run": str(run)}]  # fmt: skip
    got = {r["method"]: r for r in rt.local_rows(rows, regions)}
    assert set(got) == {"recipe, as shipped", "recipe, local scale", "recipe, local offset + scale"}  # pooled: none
    assert all(r["n"] == n and r["fit_n"] == n for r in got.values())  # fitted on B's val tile, scored on the rest
    shipped, offset = got["recipe, as shipped"], got["recipe, local offset + scale"]
    assert shipped["factor"] == 1.0 and shipped["bias"] == pytest.approx(4.0, abs=0.2)
    assert offset["offset"] == pytest.approx(-4.0, abs=0.2) and abs(offset["bias"]) < 0.2
    assert offset["rmse"] == pytest.approx(2.0, rel=0.05)
    assert offset["rmse"] < shipped["rmse"]
    assert offset["factor"] == pytest.approx(2.0, rel=0.05)  # residual sd 2 against sigma 1 (Gaussian NLL)
    assert offset["within_1sigma"] == pytest.approx(0.68, abs=0.03)
    assert got["recipe, local scale"]["factor"] > 4.0  # without the offset, only widening covers the bias


def test_recipe_space_adds_the_cv_section_and_its_changes_only_to_recipe_cv(tmp_path):
    from tune_agb.search.space import load_search_space

    changes = ["--cv-set", "experiment.num_samples=12", "--cv-set", "experiment.time_budget_s=900"]
    a = rt.parse_args(["--cv-k", "4", *changes])
    file = rt.yaml.safe_load(Path(a.space).read_text())
    assert rt.recipe_space("recipe", 0, a) == file  # the recipe as a user runs it
    other = rt.recipe_space("recipe", 2, a)  # another seed: the searcher's, the trials' and the fold draw's
    assert other["searcher"]["seed"] == other["fixed"]["seed"] == other["cv"]["seed"] == 2
    assert {k: v for k, v in other["cv"].items() if k != "seed"} == {k: v for k, v in file["cv"].items() if k != "seed"}
    seeded = rt.recipe_space("recipe_cv", 3, a)
    assert seeded["cv"] == {"k": 4, "block_size": 2, "seed": 3}
    assert seeded["searcher"]["seed"] == 3 and seeded["fixed"]["seed"] == 3
    assert seeded["experiment"]["num_samples"] == 12 and seeded["experiment"]["time_budget_s"] == 900
    # a space that selects on val (the earlier recipe): recipe keeps it so, whatever the seed
    val = tmp_path / "val.yaml"
    val.write_text(rt.yaml.safe_dump({k: v for k, v in file.items() if k != "cv"}))
    assert "cv" not in rt.recipe_space("recipe", 1, rt.parse_args(["--space", str(val)]))
    path = tmp_path / "space.yaml"
    path.write_text(rt.yaml.safe_dump(seeded))
    space = load_search_space(path)  # what the search reads: valid, and the final: recipe kept
    assert space.cv["k"] == 4 and space.final["calibration"] == "distance"
    with pytest.raises(SystemExit, match="cv-set"):
        rt.parse_args(["--cv-set", "experiment.num_samples"])  # no value: one clear error
