"""ASHA whose rung records survive an interrupted search.

Ray does not save the scheduler's rungs with the experiment: after ``Tuner.restore`` a plain ``ASHAScheduler``
starts empty and would let every trial pass the rungs it reaches next. :class:`ResumableASHA` rebuilds the rungs
from the results the trials reported before the interruption (read from the experiment folder, replayed in the order
they were reported), so its decisions after a resume are the ones it would have made without the interruption.
Trials are also assigned to brackets by a hash of their id, so the assignment survives a restart too. The Ray
internals this needs are reached through :mod:`tune_agb.search.ray_internals` only.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler

from tune_agb.search import ray_internals as ri
from tune_agb.search.experiment import read_trial_rows


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that rebuilds its rungs from the experiment's stored results when a search resumes.

    Args:
        experiment_uri: ``STORAGE/NAME`` of the experiment (where the trials' results are stored).
        time_attr: the reported counter the rungs are measured in (``epoch``: it goes on across a resume).
        **kwargs: ``max_t``, ``grace_period``, ``reduction_factor``, ``brackets`` of ``ASHAScheduler``.
    """

    def __init__(self, experiment_uri: str, time_attr: str = "epoch", **kwargs: Any):
        super().__init__(time_attr=time_attr, **kwargs)
        ri.check_asha(self)
        self.experiment_uri = experiment_uri
        # Own state, named apart from Ray's private attributes: whether the rungs were rebuilt in this process, and
        # the epoch at which a rung had cut each trial before the interruption.
        self.rebuilt = False
        self.stopped_at: dict[str, float] = {}

    def bracket_of(self, trial_id: str) -> Any:
        """The trial's bracket: same odds as ASHA's own choice (brackets with more rungs are likelier), but seeded
        by the trial id."""
        brackets = ri.brackets(self)
        sizes = np.array([len(ri.rungs(b)) for b in brackets])
        probs = np.e ** (sizes - sizes.max())
        rng = np.random.default_rng(zlib.crc32(trial_id.encode()))
        return brackets[int(rng.choice(len(brackets), p=probs / probs.sum()))]

    def rebuild(self, rows: list[dict[str, Any]]) -> int:
        """Replay reported results (any order: they are sorted by ``wall_time``) into the rungs.

        Returns:
            The number of results replayed.
        """
        metric, sign, time_attr = ri.objective(self)
        usable = [r for r in rows if time_attr in r and metric in r and r.get(metric) is not None]
        usable.sort(key=lambda r: (r.get("wall_time", r.get("timestamp", 0)), r[time_attr]))
        last: dict[str, tuple[float, str]] = {}
        for r in usable:
            t = r[time_attr]
            action = ri.record_result(self.bracket_of(r["trial_id"]), r["trial_id"], t, sign * float(r[metric]))
            last[r["trial_id"]] = (t, action)
        # A trial whose last stored result was cut by a rung had been stopped; Ray's saved state can lag behind that
        # and run it again, and the rung, already holding its record, would then let it pass.
        self.stopped_at = {tid: t for tid, (t, action) in last.items() if action == self.STOP}
        return len(usable)

    def ensure_rebuilt(self) -> None:
        """Rebuild the rungs from the experiment folder, once per process."""
        if self.rebuilt:
            return
        self.rebuilt = True
        n = self.rebuild(read_trial_rows(self.experiment_uri))
        if n:
            print(f"ASHA: rungs rebuilt from {n} stored results", flush=True)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        metric, sign, _ = ri.objective(self)
        if not metric or not sign:
            super().on_trial_add(tune_controller, trial)  # raises Ray's own error about metric/mode
        self.ensure_rebuilt()
        ri.assign_bracket(self, trial.trial_id, self.bracket_of(trial.trial_id))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self.ensure_rebuilt()
        stopped_at = self.stopped_at.get(trial.trial_id)
        if stopped_at is not None and result.get(ri.objective(self)[2], -math.inf) >= stopped_at:
            return self.STOP  # cut by a rung before the interruption: it stays cut
        return super().on_trial_result(tune_controller, trial, result)

    def __getstate__(self) -> dict[str, Any]:
        # tuner.pkl holds the scheduler as it was when the search started; a restored copy must rebuild.
        state = self.__dict__.copy()
        state["rebuilt"] = False
        state["stopped_at"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A tuner.pkl written before these attributes had their names lacks them.
        self.__dict__.update({"rebuilt": False, "stopped_at": {}, **state})

    def rung_records(self) -> list[list[tuple[float, dict[str, float]]]]:
        """Per bracket, ``(milestone, {trial_id: signed metric})`` for each rung (for tests and debugging)."""
        return [[(m, dict(rec)) for m, rec in ri.rungs(b)] for b in ri.brackets(self)]
