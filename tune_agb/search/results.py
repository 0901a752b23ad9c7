"""A search's results as Ray stored them, turned into ``results.parquet`` and ``best.yaml`` (their format:
:mod:`tune_agb.runs.search_dir`), and the summary printed at the end of a search.

Both files are built from the trials' stored results (:func:`tune_agb.search.experiment.read_trial_rows`), so they
can be rewritten at any time from the experiment folder alone (after a finished, interrupted or resumed search).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from tune_agb.runs import Best, best_of, rank_trials, write_best, write_results
from tune_agb.search.experiment import read_trial_rows
from tune_agb.search.space import SearchSpace

# Columns kept from each reported result besides the metrics and the config.
EXTRA_COLUMNS = ("lr", "gpu_mem_peak_gb", "infeasible", "node_id", "pid", "wall_time", "checkpoint_dir_name")


def results_frame(rows: list[dict[str, Any]], space: SearchSpace) -> pd.DataFrame:
    """One row per (trial, epoch); an epoch reported twice (re-run after a resume) keeps its latest report.

    Columns: ``trial_id``, ``epoch``, every metric (with ``cv``: the means over folds, then ``val_rmse_sd``,
    ``val_r2_sd`` and the per-fold ``val_rmse_fold0`` ...), ``lr``, ``node_id``, ``pid``, ``wall_time`` (s since the
    epoch), ``checkpoint_dir_name``, ``trial_path`` and ``config/<name>`` for each searched hyperparameter (empty
    where a conditional one was not active).
    """
    names = [p.name for p in space.params]
    metrics = space.reported
    out = []
    for r in rows:
        if "epoch" not in r:
            continue
        rec: dict[str, Any] = {"trial_id": r["trial_id"], "epoch": int(r["epoch"])}
        for m in metrics:
            v = r.get(m)
            rec[m] = float(v) if isinstance(v, (int, float)) else math.nan
        for k in EXTRA_COLUMNS:
            rec[k] = r.get(k)
        rec["trial_path"] = r.get("_trial_path")
        cfg = r.get("config") or {}
        for n in names:
            rec[f"config/{n}"] = cfg.get(n)
        out.append(rec)
    cols = ["trial_id", "epoch", *metrics, *EXTRA_COLUMNS, "trial_path", *[f"config/{n}" for n in names]]
    df = pd.DataFrame(out, columns=cols)
    if df.empty:
        return df
    df = df.sort_values(["trial_id", "epoch", "wall_time"], na_position="first")
    df = df.drop_duplicates(["trial_id", "epoch"], keep="last").reset_index(drop=True)
    return df


def refresh_results(
    experiment_uri: str, space: SearchSpace, input_dir: str, label_dir: str
) -> tuple[pd.DataFrame, Best | None]:
    """Rewrite ``results.parquet`` and ``best.yaml`` in the experiment folder from the stored trial results.

    Returns:
        The results table and the best trial (None, and no best.yaml written, when no finite value was reported).
    """
    df = results_frame(read_trial_rows(experiment_uri), space)
    best = best_of(df, space, experiment_uri, input_dir, label_dir)
    write_results(experiment_uri, df)
    if best is not None:
        write_best(experiment_uri, best)
    return df, best


def summary(df: pd.DataFrame, space: SearchSpace, top: int = 5) -> str:
    """A table of the ``top`` trials by their best epoch (:func:`tune_agb.runs.rank_trials`), with their searched
    hyperparameters."""
    ranked = rank_trials(df, space)[:top]
    if not ranked:
        return "no trial reported a result"
    spread = f"{space.metric}_sd" if f"{space.metric}_sd" in df else None  # cv: the spread over folds
    rows = []
    for t in ranked:
        row = {"trial_id": t.trial_id, space.metric: t.value}
        if spread is not None:
            at = df[(df["trial_id"].astype(str) == t.trial_id) & (df["epoch"] == t.epoch)]
            row[spread] = at[spread].iloc[-1] if len(at) else math.nan
        row |= {"epoch": t.epoch, "epochs_run": t.last_epoch}
        row |= {p.name: t.params.get(p.name) for p in space.params}
        rows.append(row)
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        text = pd.DataFrame(rows).to_string(index=False)
    return text + "".join(f"\n{line}" for line in infeasible_lines(df))


def infeasible_lines(df: pd.DataFrame) -> list[str]:
    """One line per trial that could not run on its device share (its reason), for the summary."""
    if "infeasible" not in df or df.empty:
        return []
    bad = df[df["infeasible"].map(lambda v: isinstance(v, str) and bool(v))].drop_duplicates("trial_id")
    return [f"trial {r.trial_id} {r.infeasible}" for r in bad.itertuples()]
