"""How early can a rung judge? Replays ASHA's rung decisions on the full curves of random search to max_t (issue 31).

    python bench/rung_replay.py --runs /work/se/b2/runs [--seeds 0,1,2,3] [--orders 200]
        [--schedule 1,4:4 --schedule 2,6:3 ...] [--json FILE]

Reads the ``random_full_sSEED`` searches that ``bench/search_efficiency.py --out DIR`` leaves under ``DIR/runs``:
every trial ran every epoch, so its whole val RMSE curve is known. Prints

- for each epoch k, the Spearman rank correlation between the trials' val RMSE at epoch k and their best val RMSE
  over all epochs (per seed, and the mean): how well a rung at epoch k ranks the trials it cuts;
- for each rung schedule (rungs:reduction factor), asynchronous successive halving replayed on those curves, one
  trial after the other in ``--orders`` random orders per seed: a trial reaching a rung goes on if its val RMSE
  there is within the best 1/factor of every value recorded at that rung so far (the first one always goes on).
  The share of random search's trial-epochs it spends, its best val RMSE's gap to random search's, and how often
  that gap exceeds 5 %.

The replay keeps the configurations random search drew (no searcher) and runs one trial at a time, so it isolates
the rungs' judgement; a real search adds Optuna's choices and two trials at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tune_agb.runs import read_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency import REFERENCE, run_name

DEFAULT_SCHEDULES = ("1,4:4", "1,3,9:3", "2,8:4", "2,6:3", "3,9:3", "4:4", "4,8:2", "6:4")


def curves(runs: Path, seed: int) -> np.ndarray:
    """The val RMSE curves (trials x epochs) of random search to max_t for one seed."""
    where = runs / run_name(REFERENCE, seed)
    df = read_results(str(where), columns=["trial_id", "epoch", "val_rmse"])
    if df.empty:
        raise SystemExit(f"{where}: no results.parquet (run bench/search_efficiency.py with {REFERENCE} first)")
    wide = df.pivot(index="trial_id", columns="epoch", values="val_rmse")
    if wide.isna().any().any():
        raise SystemExit(f"{where}: not every trial ran every epoch")
    return wide.to_numpy()


def parse_schedule(text: str) -> tuple[tuple[int, ...], float]:
    try:
        rungs, factor = text.split(":")
        return tuple(int(r) for r in rungs.split(",")), float(factor)
    except ValueError:
        raise SystemExit(f"--schedule {text}: expected RUNG,RUNG,...:FACTOR, e.g. 2,6:3") from None


def replay(c: np.ndarray, order: np.ndarray, rungs: tuple[int, ...], factor: float) -> tuple[int, float]:
    """Trial-epochs spent and best val RMSE of successive halving over the curves ``c`` in ``order``."""
    recorded: dict[int, list[float]] = {r: [] for r in rungs}
    spent, best = 0, np.inf
    for i in order:
        stop = c.shape[1]
        for r in rungs:
            if r >= stop:
                break
            recorded[r].append(c[i, r - 1])
            if len(recorded[r]) > 1 and c[i, r - 1] > np.percentile(recorded[r], 100 / factor):
                stop = r
                break
        spent += stop
        best = min(best, float(c[i, :stop].min()))
    return spent, best


def rank_fidelity(c: np.ndarray) -> list[float]:
    """Spearman correlation of each epoch's val RMSE with the trials' best over all epochs."""
    best = pd.Series(c.min(axis=1)).rank()
    return [float(np.corrcoef(pd.Series(c[:, k]).rank(), best)[0, 1]) for k in range(c.shape[1])]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="the runs/ folder of a search_efficiency.py --out")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--orders", type=int, default=200, help="random trial orders replayed per seed")
    p.add_argument("--schedule", action="append", help="RUNG,RUNG,...:FACTOR (repeatable)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    data = {s: curves(Path(a.runs), s) for s in seeds}
    fidelity = {s: rank_fidelity(c) for s, c in data.items()}
    n_epochs = min(c.shape[1] for c in data.values())
    print("epoch  " + "  ".join(f"seed {s:>2}" for s in seeds) + "   mean")
    for k in range(n_epochs):
        per = [fidelity[s][k] for s in seeds]
        print(f"{k + 1:>5}  " + "  ".join(f"{v:>7.2f}" for v in per) + f"  {np.mean(per):>5.2f}")
    out = {"fidelity": fidelity, "schedules": {}}
    print("\nschedule    share of trial-epochs (median)   gap (median)   P(gap > 5 %)")
    for text in a.schedule or DEFAULT_SCHEDULES:
        rungs, factor = parse_schedule(text)
        rng = np.random.default_rng(0)  # the same trial orders for every schedule, whichever others ran
        shares, gaps = [], []
        for c in data.values():
            for _ in range(a.orders):
                spent, best = replay(c, rng.permutation(len(c)), rungs, factor)
                shares.append(spent / c.size)
                gaps.append(best / c.min() - 1)
        row = {
            "share": float(np.median(shares)),
            "gap": float(np.median(gaps)),
            "p_over_5": float(np.mean(np.array(gaps) > 0.05)),
        }
        out["schedules"][text] = row
        print(f"{text:>10}  {100 * row['share']:>27.1f} %  {100 * row['gap']:>+11.1f} %  {row['p_over_5']:>12.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
