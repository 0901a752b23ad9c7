"""The one ranking of a search's trials (best.yaml, final_train --ensemble-top, the report and summaries use it).

A trial is ranked by the search's metric at its best epoch: the best finite value over the epochs it reported. A
missing value is one idea everywhere (:func:`is_missing`): None, NaN, ``pd.NA`` or a non-finite float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd

from tune_agb.errors import TuneAgbError
from tune_agb.location import location_of, resolve

if TYPE_CHECKING:  # the space module imports the training code; ranking needs only the object
    from tune_agb.search.space import ParamSpec, SearchSpace


@dataclass(frozen=True)
class RankedTrial:
    """One trial of a search at its best epoch.

    ``value``: the best finite value of the search metric over the trial's epochs (nan when none); ``epoch``: the
    (first) epoch of that value (None when no finite value); ``last_epoch``: the last epoch it reported; ``params``:
    the searched values typed by their ParamSpec (inactive conditional ones left out); ``checkpoint``: the location
    of the best epoch's checkpoint folder (None: not recorded); ``trial_path``: the trial's folder;
    ``finished_at``: its last ``wall_time`` (s since the epoch; nan if unknown); ``duplicates``: with
    ``distinct=True``, the trials that sampled the same params (as good or worse).
    """

    trial_id: str
    value: float
    epoch: int | None
    last_epoch: int
    params: dict[str, Any]
    checkpoint: str | None
    trial_path: str | None
    finished_at: float
    duplicates: tuple[str, ...] = ()

    @property
    def scored(self) -> bool:
        """Whether the trial reported a finite value of the metric."""
        return self.epoch is not None


def is_missing(value: Any) -> bool:
    """Whether a stored value is missing: None, NaN, ``pd.NA``, or a number that is not finite."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, (int, float)) or hasattr(value, "item"):
        try:
            return not math.isfinite(float(value))
        except (TypeError, ValueError):
            return False
    return False


def _number(value: Any) -> float:
    """A stored metric value as a float; nan when it is missing or not a number."""
    if isinstance(value, bool) or is_missing(value):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _typed(spec: ParamSpec, raw: Any, where: str, trial_id: str) -> Any:
    """A searched value as stored in results.parquet as the parameter's type; None when inactive (missing)."""
    if is_missing(raw):
        return None
    raw = raw.item() if hasattr(raw, "item") else raw
    try:
        return spec.from_stored(raw)
    except ValueError:
        raise TuneAgbError(
            f"{where}: trial {trial_id}: config/{spec.name} = {raw!r} is not a value of the searched parameter"
        ) from None


def rank_trials(
    results: pd.DataFrame, space: SearchSpace, experiment: str | None = None, distinct: bool = False
) -> list[RankedTrial]:
    """The trials of a results table, best first.

    Args:
        results: results.parquet as a DataFrame: ``trial_id``, ``epoch``, the metric, and where recorded
            ``config/<name>``, ``checkpoint_dir_name``, ``trial_path``, ``wall_time``.
        space: the search space: its ``metric`` and ``mode`` (``min``/``max``) rank, its params type ``params``.
        experiment: the experiment folder ``STORAGE/NAME`` (checkpoints are located like it; errors name it).
        distinct: keep only the best trial of each distinct set of searched values (the others in ``duplicates``).

    Returns:
        Trials with a finite value by it (``mode``), ties by trial id; then those without one, by trial id.

    Raises:
        TuneAgbError: one line when a stored searched value is not a value of its parameter.
    """
    metric = space.metric
    if results.empty or "trial_id" not in results or "epoch" not in results:
        return []
    where = f"{experiment.rstrip('/')}/results.parquet" if experiment else "results.parquet"
    like = resolve(experiment) if experiment else None
    trials = []
    for tid, g in results.groupby(results["trial_id"].astype(str), sort=False):
        g = g.sort_values("epoch", kind="stable")
        values = [_number(v) for v in (g[metric] if metric in g else [math.nan] * len(g))]
        best_i = None
        for i, v in enumerate(values):
            if math.isnan(v):
                continue
            if best_i is None or (v < values[best_i] if space.mode == "min" else v > values[best_i]):
                best_i = i
        row = g.iloc[best_i if best_i is not None else 0]
        params = {p.name: _typed(p, row.get(f"config/{p.name}"), where, str(tid)) for p in space.params}
        ckpt, path = row.get("checkpoint_dir_name"), row.get("trial_path")
        checkpoint = None
        if best_i is not None and isinstance(ckpt, str) and isinstance(path, str):
            checkpoint = location_of(like, f"{path}/{ckpt}") if like else f"{path}/{ckpt}"
        walls = [_number(v) for v in g["wall_time"]] if "wall_time" in g else []
        walls = [w for w in walls if not math.isnan(w)]
        trials.append(
            RankedTrial(
                trial_id=str(tid),
                value=values[best_i] if best_i is not None else math.nan,
                epoch=int(row["epoch"]) if best_i is not None else None,
                last_epoch=int(g["epoch"].max()),
                params={n: v for n, v in params.items() if v is not None},
                checkpoint=checkpoint,
                trial_path=path if isinstance(path, str) else None,
                finished_at=max(walls) if walls else math.nan,
            )
        )
    sign = 1.0 if space.mode == "min" else -1.0
    trials.sort(key=lambda t: (not t.scored, sign * t.value if t.scored else 0.0, t.trial_id))
    if not distinct:
        return trials
    kept: dict[tuple, RankedTrial] = {}
    for t in trials:
        key = tuple(sorted((n, repr(v)) for n, v in t.params.items()))
        if key in kept:
            kept[key] = replace(kept[key], duplicates=(*kept[key].duplicates, t.trial_id))
        else:
            kept[key] = t
    return list(kept.values())
