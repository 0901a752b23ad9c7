"""Every Ray internal tune_agb relies on, in one place: ASHA's brackets, rungs and trial-to-bracket map, and
OptunaSearch's map from Ray trials to Optuna trials and its study (for :class:`~tune_agb.search.logging_callbacks.
StudySearch`, which tags Optuna trials and records a trial that finished after an error).

Ray does not save ASHA's rung records with the experiment, and has no public way to read or fill them
(ray-project/ray#30838), so :class:`~tune_agb.search.asha.ResumableASHA` rebuilds them through these functions.
No other module touches a private Ray attribute. :func:`check_asha` names what a Ray version changed;
``tests/test_search_ray_internals.py`` checks each internal (presence, shape, behaviour) against the installed Ray.
"""

from __future__ import annotations

import inspect
from typing import Any

import ray
from ray.tune.schedulers import AsyncHyperBandScheduler

from tune_agb.errors import TuneAgbError

# What tune_agb reads or calls, and the shape it expects (Ray 2.60): checked by check_asha and the tests.
SCHEDULER_ATTRS: dict[str, str] = {
    "_brackets": "list of brackets",
    "_trial_info": "dict trial_id -> bracket",
    "_metric": "metric name (None before set_search_properties)",
    "_metric_op": "1.0 (max), -1.0 (min) or None",
    "_time_attr": "name of the progress attribute",
}
BRACKET_ATTRS: dict[str, str] = {
    "_rungs": "list of (milestone, {trial_id: signed value}), highest milestone first",
    "on_result": "method (trial, cur_iter, cur_rew) -> CONTINUE or STOP",
}


class _TrialRef:
    """What ``_Bracket.on_result`` reads of a trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def brackets(scheduler: AsyncHyperBandScheduler) -> list[Any]:
    """The scheduler's brackets (Ray's ``_Bracket`` objects)."""
    return scheduler._brackets


def rungs(bracket: Any) -> list[tuple[float, dict[str, float]]]:
    """A bracket's rungs, highest milestone first: ``(milestone, {trial_id: signed value})`` (the live records)."""
    return bracket._rungs


def objective(scheduler: AsyncHyperBandScheduler) -> tuple[str | None, float | None, str]:
    """``(metric, sign, time_attr)``: sign is 1.0 for max, -1.0 for min (None before metric/mode are set)."""
    return scheduler._metric, scheduler._metric_op, scheduler._time_attr


def record_result(bracket: Any, trial_id: str, t: float, signed_value: float) -> str:
    """Give a bracket one result as ASHA does (``signed_value`` = sign * metric); returns CONTINUE or STOP."""
    return bracket.on_result(_TrialRef(trial_id), t, signed_value)


def assign_bracket(scheduler: AsyncHyperBandScheduler, trial_id: str, bracket: Any) -> None:
    """Put a trial in a bracket (what ASHA's ``on_trial_add`` does with a random choice)."""
    scheduler._trial_info[trial_id] = bracket


def assigned_bracket(scheduler: AsyncHyperBandScheduler, trial_id: str) -> Any | None:
    """The bracket a trial is in; None when it has none (never added, or completed)."""
    return scheduler._trial_info.get(trial_id)


def asha_problems(scheduler: Any) -> list[str]:
    """What is missing or shaped differently from what this module expects, one item per internal."""
    owner = type(scheduler).__name__
    out = [f"{owner}.{a} ({what}) is missing" for a, what in SCHEDULER_ATTRS.items() if not hasattr(scheduler, a)]
    if out:
        return out
    if not isinstance(scheduler._brackets, list) or not scheduler._brackets:
        out.append(f"{owner}._brackets is not a non-empty list ({type(scheduler._brackets).__name__})")
    if not isinstance(scheduler._trial_info, dict):
        out.append(f"{owner}._trial_info is not a dict ({type(scheduler._trial_info).__name__})")
    if not isinstance(scheduler._time_attr, str):
        out.append(f"{owner}._time_attr is not a str ({type(scheduler._time_attr).__name__})")
    if scheduler._metric_op not in (None, 1.0, -1.0):
        out.append(f"{owner}._metric_op is {scheduler._metric_op!r}, not 1.0, -1.0 or None")
    for b in scheduler._brackets if isinstance(scheduler._brackets, list) else []:
        name = type(b).__name__
        missing = [f"{name}.{a} ({what}) is missing" for a, what in BRACKET_ATTRS.items() if not hasattr(b, a)]
        if missing:
            out += missing
            break
        shaped = isinstance(b._rungs, list) and all(
            isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], dict) for r in b._rungs
        )
        if not shaped:
            out.append(f"{name}._rungs is not a list of (milestone, dict)")
        try:
            n_params = len(inspect.signature(b.on_result).parameters)
        except (TypeError, ValueError):
            n_params = -1
        if n_params != 3:
            out.append(f"{name}.on_result does not take (trial, cur_iter, cur_rew)")
        if out:
            break
    return out


def check_asha(scheduler: Any) -> None:
    """Fail in one line naming the Ray version and the internal when Ray changed what this module relies on.

    Raises:
        TuneAgbError: listing each internal that is missing or shaped differently.
    """
    problems = asha_problems(scheduler)
    if problems:
        raise TuneAgbError(
            f"Ray {ray.__version__} changed ASHA internals that tune_agb's resumable ASHA relies on: "
            f"{'; '.join(problems)} (use the Ray version pinned in pyproject.toml, or update "
            "tune_agb/search/ray_internals.py)"
        )


# OptunaSearch (Ray 2.60): what StudySearch reads.
OPTUNA_SEARCH_ATTRS: dict[str, str] = {
    "_ot_trials": "dict Ray trial id -> optuna Trial",
    "_ot_study": "the optuna Study",
    "_completed_trials": "set of Ray trial ids Optuna was told about",
}


def optuna_trial(searcher: Any, trial_id: str) -> Any | None:
    """The Optuna trial behind a Ray trial (None if the searcher did not suggest it)."""
    return searcher._ot_trials.get(trial_id)


def optuna_study(searcher: Any) -> Any:
    """The searcher's Optuna study."""
    return searcher._ot_study


def optuna_completed(searcher: Any, trial_id: str) -> bool:
    """Whether the searcher already told Optuna how the Ray trial ended."""
    return trial_id in searcher._completed_trials


def optuna_search_problems(searcher: Any) -> list[str]:
    """What is missing of the OptunaSearch internals above, one item each (empty: all there)."""
    return [
        f"{type(searcher).__name__}.{a} ({what}) is missing (ray {ray.__version__})"
        for a, what in OPTUNA_SEARCH_ATTRS.items()
        if not hasattr(searcher, a)
    ]
