"""bench/rung_replay.py: successive halving replayed on full curves, and how well each epoch ranks the trials."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import rung_replay as rr

# Four trials, four epochs. Trial 0 starts worst and ends best; the others start well and stall.
CURVES = np.array(
    [
        [120.0, 110.0, 40.0, 30.0],
        [60.0, 55.0, 50.0, 50.0],
        [70.0, 65.0, 60.0, 58.0],
        [80.0, 75.0, 70.0, 69.0],
    ]
)


def test_replay_spends_every_epoch_without_rungs_and_cuts_at_a_rung() -> None:
    order = np.arange(4)
    assert rr.replay(CURVES, order, (), 4) == (16, 30.0)
    # A rung at epoch 1 keeps the first trial (nothing to compare with) and the second (60 is within the best quarter
    # of 120 and 60), and cuts the next two. Trial 0 first: its late drop is seen. Trial 0 last: it is cut at epoch 1.
    assert rr.replay(CURVES, order, (1,), 4) == (4 + 4 + 1 + 1, 30.0)
    spent, best = rr.replay(CURVES, np.array([1, 2, 3, 0]), (1,), 4)
    assert (spent, best) == (4 + 1 + 1 + 1, 50.0)
    # At epoch 3 trial 0 already leads: it goes on in either order.
    assert rr.replay(CURVES, np.array([1, 2, 3, 0]), (3,), 4)[1] == 30.0


def test_rank_fidelity_and_main_read_the_random_searches(tmp_path: Path) -> None:
    fid = rr.rank_fidelity(CURVES)
    assert fid[0] < 0 < fid[2] and fid[3] == pytest.approx(1.0)
    run = tmp_path / "runs" / "random_full_s7"
    run.mkdir(parents=True)
    rows = [{"trial_id": f"t{i}", "epoch": k + 1, "val_rmse": CURVES[i, k]} for i in range(4) for k in range(4)]
    pd.DataFrame(rows).to_parquet(run / "results.parquet")
    out = rr.main(
        [
            "--runs",
            str(tmp_path / "runs"),
            "--seeds",
            "7",
            "--orders",
            "20",
            "--schedule",
            "3:4",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert out["fidelity"][7] == pytest.approx(fid)
    row = json.loads((tmp_path / "r.json").read_text())["schedules"]["3:4"]
    assert row["gap"] == 0.0 and row["p_over_5"] == 0.0 and 0.5 < row["share"] < 1.0
    with pytest.raises(SystemExit, match="--schedule x"):
        rr.parse_schedule("x")
