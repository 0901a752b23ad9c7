"""ASHA whose rung records survive an interrupted search.

Ray does not save the scheduler's rungs with the experiment: after ``Tuner.restore`` a plain ``ASHAScheduler``
starts empty and would let every trial pass the rungs it reaches next. :class:`ResumableASHA` rebuilds the rungs
from the results the trials reported before the interruption (their ``result.json`` files, replayed in the order
they were reported), so its decisions after a resume are the ones it would have made without the interruption.
Trials are also assigned to brackets by a hash of their id, so the assignment survives a restart too.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from ray.tune.schedulers import ASHAScheduler

RESULT_FILE = "result.json"
RESULTS_LOG = "results.jsonl"  # tune_agb.search.trainable.RESULTS_LOG (not imported: keeps this module free of torch)


def read_json_lines(fs: pafs.FileSystem, path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line cut short by a killed process is skipped."""
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_trial_rows(experiment_uri: str) -> list[dict[str, Any]]:
    """Every result row of every trial under an experiment folder (local path or ``s3://``/``gs://`` URI).

    Rows come from Ray's ``result.json`` and from the report log saved in each checkpoint directory
    (``results.jsonl``; it survives a hard kill that loses ``result.json`` rows). A row reported twice appears
    once. ``checkpoint_dir_name`` is set to the kept checkpoint directory of the row's epoch (None if deleted);
    ``_trial_path`` is the trial folder.
    """
    if "://" not in experiment_uri:
        experiment_uri = os.path.abspath(experiment_uri)
    fs, root = pafs.FileSystem.from_uri(experiment_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    except OSError:  # the experiment folder does not exist yet
        return []
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        found = {}
        for r in read_json_lines(fs, f"{entry.path}/{RESULT_FILE}"):
            if "trial_id" in r and "epoch" in r:
                found[(r["epoch"], r.get("wall_time"))] = r
        ckpt_of_epoch: dict[int, str] = {}
        subdirs = fs.get_file_info(pafs.FileSelector(entry.path, allow_not_found=True, recursive=False))
        for sub in sorted(subdirs, key=lambda i: i.base_name):
            if sub.type != pafs.FileType.Directory or not sub.base_name.startswith("checkpoint_"):
                continue
            log = read_json_lines(fs, f"{sub.path}/{RESULTS_LOG}")
            if log:
                ckpt_of_epoch[log[-1]["epoch"]] = sub.base_name
            for r in log:
                key = (r["epoch"], r.get("wall_time"))
                found[key] = {**r, **found.get(key, {})}  # Ray's row has more fields (time_total_s, ...)
        for r in found.values():
            r["checkpoint_dir_name"] = ckpt_of_epoch.get(r["epoch"])
            r["_trial_path"] = entry.path
            rows.append(r)
    return rows


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that rebuilds its rungs from the experiment's stored results when a search resumes.

    Args:
        experiment_uri: ``STORAGE/NAME`` of the experiment (where the trials' ``result.json`` files are).
        time_attr: the reported counter the rungs are measured in (``epoch``: it goes on across a resume).
        **kwargs: ``max_t``, ``grace_period``, ``reduction_factor``, ``brackets`` of ``ASHAScheduler``.
    """

    def __init__(self, experiment_uri: str, time_attr: str = "epoch", **kwargs: Any):
        super().__init__(time_attr=time_attr, **kwargs)
        self.experiment_uri = experiment_uri
        self._rebuilt = False
        self._stopped_at: dict[str, float] = {}

    def _bracket_of(self, trial_id: str) -> Any:
        # Same odds as ASHA's own choice (brackets with more rungs are likelier), but seeded by the trial id.
        sizes = np.array([len(b._rungs) for b in self._brackets])
        probs = np.e ** (sizes - sizes.max())
        rng = np.random.default_rng(zlib.crc32(trial_id.encode()))
        return self._brackets[int(rng.choice(len(self._brackets), p=probs / probs.sum()))]

    def rebuild(self, rows: list[dict[str, Any]]) -> int:
        """Replay reported results (any order: they are sorted by ``wall_time``) into the rungs.

        Returns:
            The number of results replayed.
        """
        usable = [r for r in rows if self._time_attr in r and self._metric in r and r.get(self._metric) is not None]
        usable.sort(key=lambda r: (r.get("wall_time", r.get("timestamp", 0)), r[self._time_attr]))

        class _Stub:  # _Bracket.on_result only reads trial.trial_id
            def __init__(self, trial_id: str):
                self.trial_id = trial_id

        last: dict[str, tuple[float, str]] = {}
        for r in usable:
            bracket = self._bracket_of(r["trial_id"])
            t = r[self._time_attr]
            action = bracket.on_result(_Stub(r["trial_id"]), t, self._metric_op * float(r[self._metric]))
            last[r["trial_id"]] = (t, action)
        # A trial whose last stored result was cut by a rung had been stopped; Ray's saved state can lag behind that
        # and run it again, and the rung, already holding its record, would then let it pass.
        self._stopped_at = {tid: t for tid, (t, action) in last.items() if action == self.STOP}
        return len(usable)

    def _ensure_rebuilt(self) -> None:
        if self._rebuilt:
            return
        self._rebuilt = True
        n = self.rebuild(read_trial_rows(self.experiment_uri))
        if n:
            print(f"ASHA: rungs rebuilt from {n} stored results", flush=True)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._metric or not self._metric_op:
            super().on_trial_add(tune_controller, trial)  # raises Ray's own error about metric/mode
        self._ensure_rebuilt()
        self._trial_info[trial.trial_id] = self._bracket_of(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._ensure_rebuilt()
        stopped_at = self._stopped_at.get(trial.trial_id)
        if stopped_at is not None and result.get(self._time_attr, -math.inf) >= stopped_at:
            return self.STOP  # cut by a rung before the interruption: it stays cut
        return super().on_trial_result(tune_controller, trial, result)

    def __getstate__(self) -> dict[str, Any]:
        # tuner.pkl holds the scheduler as it was when the search started; a restored copy must rebuild.
        state = self.__dict__.copy()
        state["_rebuilt"] = False
        state["_stopped_at"] = {}
        return state

    def rung_records(self) -> list[list[tuple[float, dict[str, float]]]]:
        """Per bracket, ``(milestone, {trial_id: signed metric})`` for each rung (for tests and debugging)."""
        return [[(m, dict(rec)) for m, rec in b._rungs] for b in self._brackets]
