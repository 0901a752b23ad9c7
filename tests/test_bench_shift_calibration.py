"""bench/shift_calibration.py: runs of bench/region_transfer.py read back and scored under val-fitted calibrations,
the engine's ``distance`` among them, on a layout whose test tiles lie far from the train tiles' bands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import shift_calibration as sc

SIZE = 16


def fake_run(where: Path, name: str, shift: float, seed: int) -> None:
    """A dataset layout (3 bands; test tiles' bands shifted by ``shift``) and a finished run beside it whose residuals
    grow with the distance from the train pixels' bands, as the ``distance`` calibration models, and whose shipped
    sigma is one val-fitted factor."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n, off in (("train", 4, 0.0), ("val", 3, 0.0), ("test", 3, shift)):
        for i in range(n):
            x = rng.normal(off, 1.0, (3, SIZE, SIZE)).astype(np.float32)
            y = np.full((SIZE, SIZE), np.nan, np.float32)
            r, c = rng.integers(0, SIZE, 150), rng.integers(0, SIZE, 150)
            d = np.sqrt((x[:, r, c] ** 2).sum(axis=0))
            mean = rng.uniform(5, 30, r.size)
            y[r, c] = mean + 2.0 * np.maximum(1.0, d / 1.54) * rng.normal(size=r.size)
            for side, a in (("inputs", x), ("labels", y)):
                (where / "data" / side / split).mkdir(parents=True, exist_ok=True)
                np.save(where / "data" / side / split / f"t{split}{i}.npy", a)
            if split != "train":
                keep = np.isfinite(y[r, c])
                rows.append(pd.DataFrame({"split": split, "tile": f"t{split}{i}", "row": r, "col": c, "label": y[r, c],
                                          "mean": mean, "std_uncalibrated": 1.0})[keep])  # fmt: skip
    d = pd.concat(rows, ignore_index=True).drop_duplicates(["tile", "row", "col"], keep="last")
    val = d[d.split == "val"]
    d["std"] = sc.fit_scale(val["label"].to_numpy(), val["mean"].to_numpy(), np.ones(len(val)))
    run = where / "runs" / name
    run.mkdir(parents=True)
    d.to_parquet(run / "predictions.parquet")
    (run / "calibration.json").write_text(json.dumps({"method": "scale", "loss": "gaussian_nll"}))


def test_distance_widens_on_shifted_tiles_and_folds_pool(tmp_path: Path) -> None:
    fake_run(tmp_path / "ab", "recipe_s0", shift=2.0, seed=0)
    for j in range(2):
        fake_run(tmp_path / "pooledcv" / f"fold{j}", "recipe_s1", shift=0.0, seed=j + 1)
    fake_run(tmp_path / "ab", "other_s0", shift=2.0, seed=3)  # not a method asked for
    out = tmp_path / "rows.json"
    assert sc.main(["--out", str(tmp_path), "--methods", "recipe", "--json", str(out)]) == 0
    rows = {(r["direction"], r["calibration"]): r for r in json.loads(out.read_text())}
    assert {d for d, _ in rows} == {"A→B", "pooled CV"}
    ab = {c: rows["A→B", c] for c in sc.CALIBRATIONS}
    # the shifted tiles: one val factor covers too few labels; the widening brings 1 sigma near 68 %
    assert ab["shipped"]["within_1sigma"] < 0.55 and ab["shipped"]["still_right"] > 1.4
    assert abs(ab["distance"]["within_1sigma"] - 0.6827) < 0.08 and abs(ab["distance"]["still_right"] - 1) < 0.15
    assert ab["distance"]["median_width_1sigma"] > ab["shipped"]["median_width_1sigma"]
    assert abs(ab["right"]["still_right"] - 1) < 1e-9  # the reference: fitted on the test pixels
    assert ab["distance"]["d_test"] > 2 * ab["distance"]["d_val"]
    # pooled CV: both folds' test pixels in one row
    n_folds = sum(len(pd.read_parquet(p).query("split == 'test'"))
                  for p in tmp_path.glob("pooledcv/fold*/runs/recipe_s1/predictions.parquet"))  # fmt: skip
    assert rows["pooled CV", "distance"]["n"] == n_folds
