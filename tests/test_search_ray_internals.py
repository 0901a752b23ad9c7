"""The Ray internals tune_agb relies on (ASHA's brackets, rungs and trial-to-bracket map: no public API, see
ray-project/ray#30838), checked against the installed Ray: each exists, has the expected shape and behaves as
:mod:`tune_agb.search.ray_internals` assumes. A Ray upgrade that changes one fails here, naming the Ray version
and the internal; and no other module of the search touches a private Ray attribute."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from ray.tune import ResultGrid
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from tune_agb.errors import TuneAgbError
from tune_agb.search import ray_internals
from tune_agb.search import ray_internals as ri

SEARCH = Path(__file__).resolve().parents[1] / "tune_agb" / "search"


def _require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(
            f"Ray {ray.__version__}: {what}; tune_agb/search/ray_internals.py must be updated for this Ray version",
            pytrace=False,
        )


def _asha(brackets: int = 2, mode: str = "min") -> ASHAScheduler:
    s = ASHAScheduler(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3, brackets=brackets)
    s.set_search_properties("val_rmse", mode)
    return s


def test_every_internal_exists_with_the_expected_shape() -> None:
    s = _asha()
    problems = ri.asha_problems(s)
    _require(not problems, "; ".join(problems))
    for name in [*ri.SCHEDULER_ATTRS]:
        _require(hasattr(s, name), f"ASHAScheduler.{name} ({ri.SCHEDULER_ATTRS[name]}) is missing")
    for bracket in ri.brackets(s):
        for name in ri.BRACKET_ATTRS:
            _require(hasattr(bracket, name), f"{type(bracket).__name__}.{name} ({ri.BRACKET_ATTRS[name]}) is missing")


def test_objective_is_metric_sign_and_time_attr() -> None:
    _require(ri.objective(_asha(mode="min")) == ("val_rmse", -1.0, "epoch"), "_metric/_metric_op/_time_attr changed")
    _require(ri.objective(_asha(mode="max"))[1] == 1.0, "_metric_op is no longer 1.0 for mode max")
    unset = ASHAScheduler(time_attr="epoch", max_t=9, grace_period=1)
    _require(ri.objective(unset)[:2] == (None, None), "_metric/_metric_op are set before set_search_properties")


def test_brackets_hold_rungs_highest_milestone_first_starting_empty() -> None:
    s = _asha(brackets=2)
    brackets = ri.brackets(s)
    _require(len(brackets) == 2, f"_brackets has {len(brackets)} brackets for brackets=2")
    for b in brackets:
        milestones = [m for m, _ in ri.rungs(b)]
        _require(milestones == sorted(milestones, reverse=True), f"_rungs not highest milestone first: {milestones}")
        _require(all(rec == {} for _, rec in ri.rungs(b)), "_rungs of a new scheduler are not empty dicts")
    # bracket 0's lowest rung is the grace period; more brackets start higher (fewer rungs)
    _require(ri.rungs(brackets[0])[-1][0] == 1, "the first bracket's lowest rung is not at grace_period")
    _require(len(ri.rungs(brackets[1])) < len(ri.rungs(brackets[0])), "later brackets do not have fewer rungs")


def test_record_result_fills_the_rung_and_cuts_below_it() -> None:
    bracket = ri.brackets(_asha(brackets=1))[0]
    lowest = ri.rungs(bracket)[-1]
    assert ri.record_result(bracket, "t1", 1, -10.0) == TrialScheduler.CONTINUE  # first in its rung
    assert ri.record_result(bracket, "t2", 1, -5.0) == TrialScheduler.CONTINUE  # better than t1
    _require(ri.rungs(bracket)[-1] is lowest, "on_result replaced the rung tuple instead of filling its dict")
    _require(lowest[1] == {"t1": -10.0, "t2": -5.0}, f"on_result recorded {lowest[1]} (by trial id, signed value)")
    # worse than the rung's cutoff (signed: min -> -rmse): stopped, and recorded all the same
    _require(ri.record_result(bracket, "t3", 1, -20.0) == TrialScheduler.STOP, "on_result no longer cuts a bad trial")
    _require("t3" in lowest[1], "on_result did not record a stopped trial")
    # a result before the first rung records nothing
    bracket2 = ri.brackets(_asha(brackets=1))[0]
    ri.record_result(bracket2, "t1", 0, -1.0)
    _require(all(rec == {} for _, rec in ri.rungs(bracket2)), "a result below every milestone was recorded")


def test_an_assigned_bracket_is_the_one_asha_uses_for_the_trials_results() -> None:
    s = _asha(brackets=2)
    first, second = ri.brackets(s)
    trial = SimpleNamespace(trial_id="x")
    assert ri.assigned_bracket(s, "x") is None
    ri.assign_bracket(s, "x", second)
    assert ri.assigned_bracket(s, "x") is second
    s.on_trial_result(None, trial, {"epoch": 3, "val_rmse": 2.0})
    rung3 = [rec for m, rec in ri.rungs(second) if m == 3]
    _require(rung3 == [{"x": -2.0}], "on_trial_result did not use the bracket in _trial_info")
    _require(all(rec == {} for _, rec in ri.rungs(first)), "on_trial_result wrote to another bracket")
    s.on_trial_complete(None, trial, {"epoch": 4, "val_rmse": 2.0})
    _require(ri.assigned_bracket(s, "x") is None, "on_trial_complete no longer removes the trial from _trial_info")


def test_result_grid_counts_used_by_the_cli_are_public() -> None:
    for name in ("num_terminated", "num_errors", "__len__", "__getitem__"):
        _require(hasattr(ResultGrid, name), f"ResultGrid.{name} is missing")


# -- what a changed Ray looks like ------------------------------------------------------------------------------
def _fake(**changes: Any) -> SimpleNamespace:
    bracket = SimpleNamespace(_rungs=[(3, {}), (1, {})], on_result=lambda trial, cur_iter, cur_rew: "CONTINUE")
    attrs = {"_brackets": [bracket], "_trial_info": {}, "_metric": "m", "_metric_op": -1.0, "_time_attr": "epoch"}
    attrs |= changes
    return SimpleNamespace(**{k: v for k, v in attrs.items() if v is not None})


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"_trial_info": None}, "SimpleNamespace._trial_info (dict trial_id -> bracket) is missing"),
        ({"_brackets": None}, "SimpleNamespace._brackets (list of brackets) is missing"),
        ({"_brackets": [SimpleNamespace(on_result=lambda a, b, c: "")]}, "SimpleNamespace._rungs ("),
        ({"_brackets": [SimpleNamespace(_rungs={1: {}}, on_result=lambda a, b, c: "")]}, "._rungs is not a list"),
        ({"_brackets": [SimpleNamespace(_rungs=[], on_result=lambda a, b: "")]}, ".on_result does not take"),
        ({"_trial_info": []}, "._trial_info is not a dict"),
        ({"_metric_op": "min"}, "._metric_op is 'min'"),
    ],
)
def test_a_changed_internal_fails_with_one_line_naming_ray_and_the_attribute(changes: dict, named: str) -> None:
    ri.check_asha(_fake())  # the fake as Ray 2.60 has it passes
    with pytest.raises(TuneAgbError) as err:
        ri.check_asha(_fake(**changes))
    msg = str(err.value)
    assert msg.startswith(f"Ray {ray.__version__} changed ASHA internals") and named in msg and "\n" not in msg, msg


def test_resumable_asha_checks_the_internals_when_it_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from tune_agb.search.asha import ResumableASHA

    ResumableASHA("/nowhere", max_t=9, grace_period=1)
    monkeypatch.setattr(ri, "asha_problems", lambda s: ["ASHAScheduler._brackets (list of brackets) is missing"])
    with pytest.raises(TuneAgbError, match=r"ASHAScheduler\._brackets .* is missing"):
        ResumableASHA("/nowhere", max_t=9, grace_period=1)


def test_no_other_search_module_touches_a_private_ray_attribute() -> None:
    private = re.compile(r"\.\_[A-Za-z]\w*|getattr\([^)]*[\"']_[A-Za-z]")
    found = {
        p.name: private.findall(p.read_text())
        for p in sorted(SEARCH.glob("*.py"))
        if p.name != "ray_internals.py" and private.search(p.read_text())
    }
    assert not found, f"private attributes used outside ray_internals.py: {found}"


def test_optuna_search_internals_that_study_search_reads_exist() -> None:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 1e-3, 1e-2, log=True)

    searcher = OptunaSearch(space=space, metric="val_rmse", mode="min")
    assert ray_internals.optuna_search_problems(searcher) == []
    config = searcher.suggest("t1")
    assert config is not None and "lr" in config
    assert ray_internals.optuna_trial(searcher, "t1") is not None
    assert ray_internals.optuna_trial(searcher, "nope") is None
    assert not ray_internals.optuna_completed(searcher, "t1")
    searcher.on_trial_complete("t1", {"val_rmse": 3.0})
    assert ray_internals.optuna_completed(searcher, "t1")
    assert [t.value for t in ray_internals.optuna_study(searcher).get_trials()] == [3.0]
    assert ray_internals.optuna_search_problems(object()) != []
