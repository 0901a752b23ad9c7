"""Search results: ``results.parquet`` (one row per trial and epoch), ``best.yaml`` and the printed summary.

Both are built from the trials' stored results (:func:`tune_agb.search.experiment.read_trial_rows`), so they can
be rewritten at any time from the experiment folder alone (after a finished, interrupted or resumed search); the
experiment module writes them.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pyarrow as pa

from tune_agb.search.experiment import (
    CV_FOLDS_FILE,
    location_of,
    open_storage,
    read_trial_rows,
    write_best,
    write_results_table,
)
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


def best_row(df: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best (trial, epoch) over all epochs of all trials; None when no finite value was reported."""
    ok = df[df[metric].map(lambda v: isinstance(v, float) and math.isfinite(v))] if not df.empty else df
    if ok.empty:
        return None
    idx = ok[metric].idxmin() if mode == "min" else ok[metric].idxmax()
    return ok.loc[idx]


def best_record(
    df: pd.DataFrame, space: SearchSpace, experiment_uri: str, input_dir: str, label_dir: str
) -> dict[str, Any] | None:
    """The content of ``best.yaml`` (the contract with ``tune_agb.final_train --experiment``)."""
    row = best_row(df, space.metric, space.mode)
    if row is None:
        return None
    sampled = {p.name: row[f"config/{p.name}"] for p in space.params if _present(row[f"config/{p.name}"])}
    sampled = {k: (v.item() if hasattr(v, "item") else v) for k, v in sampled.items()}
    cfg = space.trial_config(sampled)  # epochs = max_t: the trial's full budget
    ckpt = None
    if isinstance(row["checkpoint_dir_name"], str) and isinstance(row["trial_path"], str):
        ckpt = location_of(experiment_uri, f"{row['trial_path']}/{row['checkpoint_dir_name']}")
    best = {
        "trial_id": str(row["trial_id"]),
        "metric": space.metric,
        "mode": space.mode,
        "value": float(row[space.metric]),
        "epoch": int(row["epoch"]),
        "config": cfg.to_dict(),
        "checkpoint": ckpt,
        "data": {"input_dir": input_dir, "label_dir": label_dir},
    }
    if space.cv is not None:
        best["cv"] = cv_record(row, space, experiment_uri)
    return best


def cv_record(row: pd.Series, space: SearchSpace, experiment_uri: str) -> dict[str, Any]:
    """best.yaml's ``cv``: ``k``, the metric's spread over folds (``value_sd``, when reported) and per-fold values
    (``fold_values``) at the best epoch, and where the fold assignment is (``folds_file``). ``value`` is the mean."""
    k = int(space.cv["k"])
    sd = row.get(f"{space.metric}_sd")
    per_fold = [row.get(f"{space.metric}_fold{j}") for j in range(k)]
    _, root = open_storage(experiment_uri)
    return {
        "k": k,
        "value_sd": float(sd) if _present(sd) else None,
        "fold_values": [float(v) for v in per_fold] if all(_present(v) for v in per_fold) else None,
        "folds_file": location_of(experiment_uri, f"{root}/{CV_FOLDS_FILE}"),
    }


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def write_results(
    experiment_uri: str, space: SearchSpace, input_dir: str, label_dir: str
) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """Rewrite ``results.parquet`` and ``best.yaml`` in the experiment folder from the stored trial results."""
    df = results_frame(read_trial_rows(experiment_uri), space)
    best = best_record(df, space, experiment_uri, input_dir, label_dir)
    # Config columns can mix ints and floats across trials; store them as Python objects turned into strings
    # only when pyarrow cannot find one type.
    write_results_table(experiment_uri, _to_arrow(df))
    if best is not None:
        write_best(experiment_uri, best)
    return df, best


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fixed = df.copy()
        for c in fixed.columns:
            if c.startswith("config/") and fixed[c].dtype == object:
                fixed[c] = fixed[c].map(lambda v: None if not _present(v) else str(v))
        return pa.Table.from_pandas(fixed, preserve_index=False)


def summary(df: pd.DataFrame, space: SearchSpace, top: int = 5) -> str:
    """A table of the ``top`` trials by their best epoch, with their searched hyperparameters."""
    if df.empty:
        return "no trial reported a result"
    asc = space.mode == "min"
    best = (
        df.sort_values(space.metric, ascending=asc)
        .drop_duplicates("trial_id")
        .merge(df.groupby("trial_id")["epoch"].max().rename("epochs_run"), on="trial_id")
        .head(top)
    )
    spread = [f"{space.metric}_sd"] if f"{space.metric}_sd" in df else []  # cv: the spread over folds
    cols = ["trial_id", space.metric, *spread, "epoch", "epochs_run", *[f"config/{p.name}" for p in space.params]]
    table = best[cols].rename(columns=lambda c: c.removeprefix("config/"))
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        text = table.to_string(index=False)
    return text + "".join(f"\n{line}" for line in infeasible_lines(df))


def infeasible_lines(df: pd.DataFrame) -> list[str]:
    """One line per trial that could not run on its device share (its reason), for the summary."""
    if "infeasible" not in df or df.empty:
        return []
    bad = df[df["infeasible"].map(lambda v: isinstance(v, str) and bool(v))].drop_duplicates("trial_id")
    return [f"trial {r.trial_id} {r.infeasible}" for r in bad.itertuples()]
