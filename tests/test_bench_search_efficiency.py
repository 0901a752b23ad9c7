"""bench/search_efficiency.py: per-seed rows from searches' results tables and best trials, and the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search_efficiency as se

from tune_agb.runs import Best


def _results(trials: dict[str, list[float]]) -> pd.DataFrame:
    """A results table: one row per trial and epoch; trials report in turn, epoch by epoch."""
    rows, t = [], 0.0
    for epoch in range(1, max(map(len, trials.values())) + 1):
        for tid, vals in trials.items():
            if epoch <= len(vals):
                t += 1.0
                rows.append({"trial_id": tid, "epoch": epoch, "val_rmse": vals[epoch - 1], "wall_time": t})
    return pd.DataFrame(rows)


def _found(df: pd.DataFrame, config: dict) -> dict:
    best = Best(trial_id="t", config=config | {"epochs": 16}, metric="val_rmse", mode="min")
    return {"df": df, "best": best, "search_s": 10.0, "test_rmse": 30.0, "final_s": 5.0, "searched": list(config)}


def test_seed_rows_read_the_best_trial_and_compare_with_the_reference():
    ref = _results({"a": [50, 45, 40, 38], "b": [60, 55, 52, 50]})  # 8 trial-epochs, best 38
    asha = _results({"c": [49, 40, 39.0], "d": [70]})  # 4 trial-epochs, best 39
    rnd = _results({"e": [48, 47], "f": [44, 43, 42]})  # random + ASHA, 5 trial-epochs
    found = {
        "random_full": _found(ref, {"lr": 1e-3}),
        "random_asha": _found(rnd, {"lr": 2e-3}),
        "optuna_asha": _found(asha, {"lr": 3e-3}),
    }
    rows = {r["method"]: r for r in se.seed_rows(5, found)}
    o = rows["optuna_asha"]
    assert o["best_config"] == {"lr": 3e-3}  # the searched keys of the best trial's config, not epochs
    assert (o["trials"], o["trial_epochs"]) == (2, 4)
    assert o["epoch_share"] == pytest.approx(4 / 8)
    assert o["val_gap"] == pytest.approx(39 / 38 - 1)
    # random + ASHA's best over its first 4 reports in wall-time order: 48, 44, 47, 43 -> 43
    assert o["random_asha_at_equal_epochs"] == 43
    assert o["vs_random_asha"] == pytest.approx(39 / 43 - 1)
    assert "vs_random_asha" not in rows["random_full"] and rows["random_full"]["epoch_share"] == 1.0


def test_summary_takes_median_and_worst_over_seeds():
    rows = []
    for seed, (share, gap) in enumerate([(0.3, 0.01), (0.5, -0.02), (0.4, 0.06)]):
        ref = _results({"a": [40.0] * 10})
        n = round(share * 10)
        rows += se.seed_rows(
            seed,
            {"random_full": _found(ref, {"lr": 1}), "x": _found(_results({"b": [40.0 * (1 + gap)] * n}), {"lr": 2})},
        )
    summary = se.summarise(rows)
    s = {r["method"]: r for r in summary}["x"]
    assert s["seeds"] == 3
    assert s["epoch_share_median"] == pytest.approx(0.4) and s["epoch_share_worst"] == pytest.approx(0.5)
    assert s["val_gap_median"] == pytest.approx(0.01) and s["val_gap_worst"] == pytest.approx(0.06)
    lines = se.target_lines(summary)
    assert any("x: trial-epochs share, median <= 40 %: met" in ln and "worst <= 5 %: MISSED" in ln for ln in lines)
