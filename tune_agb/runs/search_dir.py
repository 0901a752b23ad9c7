"""The files of a search's folder ``STORAGE/NAME`` that tune_agb reads back: their one reader and one writer each.

    search.yaml       :class:`SearchRecord`: the space, overrides and data folders the search was started with
    results.parquet   one row per (trial, epoch): :func:`write_results` / :func:`read_results` (a DataFrame)
    best.yaml         :class:`Best`: the best trial at its best epoch (:func:`best_of`), read by final_train
    cv_folds.json     the fold of every train/val tile (``tune_agb.cv.FoldAssignment``), with a cv section

``experiment`` is the folder ``STORAGE/NAME`` as a location (a path, ``file://``, ``s3://``, ``gs://``). Every file
is written atomically. Readers raise one :class:`TuneAgbError` line naming the file and what was expected. Ray's
own files (trial folders, checkpoints, experiment state) belong to :mod:`tune_agb.search.experiment`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from tune_agb.errors import TuneAgbError
from tune_agb.location import (
    first_line,
    join,
    parse_document,
    read_bytes,
    read_document,
    read_table,
    resolve,
    write_atomic,
)
from tune_agb.overrides import FLAG_PATHS, apply_overrides
from tune_agb.runs.ranking import is_missing, rank_trials

if TYPE_CHECKING:  # torch: imported where folds are used, not with this module
    from tune_agb.cv import FoldAssignment
    from tune_agb.search.space import SearchSpace

SEARCH_FILE = "search.yaml"
RESULTS_FILE = "results.parquet"
BEST_FILE = "best.yaml"
CV_FOLDS_FILE = "cv_folds.json"


# -- search.yaml ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchRecord:
    """What a search was started with: ``space`` (the search-space mapping), ``overrides`` (command-line settings),
    ``data`` (``input_dir``/``label_dir``) and ``space_file`` (the file the space came from, when known)."""

    space: dict[str, Any]
    overrides: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    space_file: str | None = None

    @property
    def changes(self) -> dict[str, Any]:
        """The overrides by dotted path (``experiment.num_samples``), older records' flag names translated."""
        return {FLAG_PATHS.get(k, k): v for k, v in self.overrides.items()}

    def ran_space(self) -> dict[str, Any]:
        """The space mapping the search ran: ``space`` with the overrides applied."""
        return apply_overrides(self.space, self.changes) if self.overrides else self.space

    def to_dict(self) -> dict[str, Any]:
        """The mapping search.yaml holds (keys in the order written)."""
        head = {"space_file": self.space_file} if self.space_file is not None else {}
        return head | {"space": self.space, "overrides": self.overrides, "data": self.data}

    @classmethod
    def from_dict(cls, d: Any, source: str) -> SearchRecord:
        """A record from its mapping; ``source`` names it in the error.

        Raises:
            TuneAgbError: when ``d`` has no ``space`` and ``overrides`` mappings.
        """
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in ("space", "overrides")):
            raise TuneAgbError(f"{source}: expected a mapping with 'space' and 'overrides' mappings")
        data = d.get("data")
        sf = d.get("space_file")
        return cls(dict(d["space"]), dict(d["overrides"]), dict(data) if isinstance(data, dict) else {},
                   None if sf is None else str(sf))  # fmt: skip


def write_search(experiment: str, record: SearchRecord) -> None:
    """Write ``search.yaml`` (creating the experiment folder)."""
    write_atomic(join(experiment, SEARCH_FILE), yaml.safe_dump(record.to_dict(), sort_keys=False).encode())


def read_search(experiment: str) -> SearchRecord | None:
    """The record of ``search.yaml``; None when there is none.

    Raises:
        TuneAgbError: when the file is not valid YAML or not such a record.
    """
    where = join(experiment, SEARCH_FILE)
    doc = read_document(where, "yaml")
    return None if doc is None else SearchRecord.from_dict(doc, where)


def read_space(experiment: str, label: str | None = None) -> tuple[SearchSpace, SearchRecord]:
    """The search space a search folder ran (its search.yaml's space with the search's overrides; parsed and
    checked) and its record.

    Raises:
        TuneAgbError: one line (starting with ``label`` when given) when there is no search.yaml or it is invalid.
    """
    from tune_agb.search.space import parse_search_space

    where = join(experiment, SEARCH_FILE)
    prefix = f"{label}: " if label else ""
    try:
        record = read_search(experiment)
    except TuneAgbError as exc:
        raise TuneAgbError(f"{prefix}{exc}") from None
    if record is None:
        raise TuneAgbError(f"{prefix}{where} not found; expected a search's folder STORAGE/NAME")
    return parse_search_space(record.ran_space(), source=where), record


# -- results.parquet --------------------------------------------------------------------------------------------
def write_results(experiment: str, results: pd.DataFrame) -> None:
    """Write ``results.parquet`` (one row per trial and epoch; see ``tune_agb.search.results.results_frame``).

    ``config/<name>`` columns that mix types across trials (ints and floats, numbers and text) are stored as text.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pandas(results, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fixed = results.copy()
        for c in fixed.columns:
            if c.startswith("config/") and fixed[c].dtype == object:
                fixed[c] = fixed[c].map(lambda v: None if v is None or v is pd.NA or v != v else str(v))
        table = pa.Table.from_pandas(fixed, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(join(experiment, RESULTS_FILE), buf.getvalue())


def read_results(experiment: str, columns: list[str] | None = None) -> pd.DataFrame:
    """``results.parquet`` as a DataFrame (``columns``: only these); an empty one when the file is not there.

    Raises:
        TuneAgbError: when the file is not a parquet table with ``trial_id`` and ``epoch`` columns.
    """
    where = join(experiment, RESULTS_FILE)
    table = read_table(where, columns)
    if table is None:
        return pd.DataFrame()
    df = table.to_pandas()
    missing = [c for c in ("trial_id", "epoch") if c not in df.columns and (columns is None or c in columns)]
    if missing:
        raise TuneAgbError(f"{where}: missing column {', '.join(missing)} (expected one row per trial and epoch)")
    return df


# -- best.yaml --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Best:
    """``best.yaml``: the contract with ``tune_agb.final_train --experiment``.

    ``config``: the complete training config of the best trial (``epochs`` = the search's ``max_t``); ``value``: the
    search ``metric`` at the trial's best ``epoch`` (``mode``: ``min``/``max``); ``checkpoint``: that epoch's
    checkpoint folder (None: not kept); ``data``: ``input_dir``/``label_dir`` of the search; ``cv`` (a cv search):
    ``k``, ``value_sd``, ``fold_values`` and ``folds_file``. Files written before a key existed read with its default.
    """

    trial_id: str
    config: dict[str, Any]
    metric: str | None = None
    mode: str | None = None
    value: float = math.nan
    epoch: int | None = None
    checkpoint: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    cv: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The mapping best.yaml holds (its keys as they always were)."""
        out = {
            "trial_id": self.trial_id,
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "epoch": self.epoch,
            "config": self.config,
            "checkpoint": self.checkpoint,
            "data": self.data,
        }
        return out | ({"cv": self.cv} if self.cv is not None else {})


def best_of(results: pd.DataFrame, space: SearchSpace, experiment: str, input_dir: str, label_dir: str) -> Best | None:
    """The best trial of a results table at its best epoch (:func:`rank_trials`, first); None without a finite value.

    Args:
        results: results.parquet as a DataFrame.
        space: the search space (metric, mode; the trial's config is ``space.trial_config`` of its params).
        experiment: the experiment folder (where its checkpoint and cv_folds.json are located).
        input_dir: the search's input tile folder, recorded for final_train.
        label_dir: its label tile folder.
    """
    ranked = rank_trials(results, space, experiment)
    if not ranked or not ranked[0].scored:
        return None
    top = ranked[0]
    cv = None
    if space.cv is not None:
        k = int(space.cv["k"])
        row = results[(results["trial_id"].astype(str) == top.trial_id) & (results["epoch"] == top.epoch)].iloc[-1]
        sd = row.get(f"{space.metric}_sd")
        per_fold = [row.get(f"{space.metric}_fold{j}") for j in range(k)]
        cv = {
            "k": k,
            "value_sd": None if is_missing(sd) else float(sd),
            "fold_values": None if any(is_missing(v) for v in per_fold) else [float(v) for v in per_fold],
            "folds_file": join(resolve(experiment), CV_FOLDS_FILE),
        }
    return Best(
        trial_id=top.trial_id,
        config=space.trial_config(top.params).to_dict(),  # epochs = max_t: the trial's full budget
        metric=space.metric,
        mode=space.mode,
        value=float(top.value),
        epoch=top.epoch,
        checkpoint=top.checkpoint,
        data={"input_dir": input_dir, "label_dir": label_dir},
        cv=cv,
    )


def write_best(experiment: str, best: Best) -> None:
    """Write ``best.yaml`` (atomically)."""
    write_atomic(join(experiment, BEST_FILE), yaml.safe_dump(best.to_dict(), sort_keys=False).encode())


def read_best(experiment: str, required: bool = True) -> Best | None:
    """``best.yaml`` of a search.

    Args:
        experiment: the experiment folder.
        required: raise when the file is not there (else None).

    Raises:
        TuneAgbError: one line when it cannot be read, is not YAML, or has no ``config`` mapping.
    """
    where = join(experiment, BEST_FILE)
    try:
        data = read_bytes(where)
    except TuneAgbError as exc:
        data, why = None, str(exc).split(": ", 1)[-1]
    else:
        why = "not found"
    if data is None:
        if not required:
            return None
        raise TuneAgbError(f"{where}: cannot read the search's best.yaml ({why}); is this a finished search?")
    d = parse_document(data, where, "yaml")
    if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
        raise TuneAgbError(f"{where}: expected a mapping with a 'config' mapping")
    try:
        epoch = d.get("epoch")
        return Best(
            trial_id=str(d.get("trial_id", "?")),
            config=dict(d["config"]),
            metric=None if d.get("metric") is None else str(d["metric"]),
            mode=None if d.get("mode") is None else str(d["mode"]),
            value=math.nan if d.get("value") is None else float(d["value"]),
            epoch=None if epoch is None else int(epoch),
            checkpoint=None if d.get("checkpoint") is None else str(d["checkpoint"]),
            data=dict(d.get("data") or {}),
            cv=dict(d["cv"]) if isinstance(d.get("cv"), dict) else None,
        )
    except (TypeError, ValueError) as exc:
        raise TuneAgbError(f"{where}: 'value', 'epoch' or 'data' has the wrong type ({first_line(exc)})") from None


# -- cv_folds.json ----------------------------------------------------------------------------------------------
def write_folds(experiment: str, folds: FoldAssignment) -> None:
    """Write ``cv_folds.json``: the search's fold assignment, reused by ``--resume`` and final_train."""
    write_atomic(join(experiment, CV_FOLDS_FILE), json.dumps(folds.to_dict(), indent=1).encode())


def read_folds(experiment: str) -> FoldAssignment | None:
    """The fold assignment saved in an experiment; None when it has none.

    Raises:
        TuneAgbError: one line when the file is there but is no fold assignment.
    """
    from tune_agb.cv import FoldAssignment

    where = join(experiment, CV_FOLDS_FILE)
    raw = read_document(where, "json")
    return None if raw is None else FoldAssignment.from_dict(raw, source=where)


# -- best.yaml + cv_folds.json of a cross-validated search ------------------------------------------------------
@dataclass(frozen=True)
class CVBest:
    """The best configuration of a cross-validated search, with what a final training needs to use its folds.

    ``config``: the complete training config (``epochs`` = the search's ``max_t``); ``epoch``: the epoch of the best
    mean over folds; ``value``/``value_sd``: the metric's mean and spread over folds there; ``checkpoint``: the folder
    of that epoch's checkpoint (``checkpoint.pt`` holding the k fold models), None when Ray did not keep it;
    ``folds``: the fold assignment; ``data``: the tile folders of the search.
    """

    experiment: str
    trial_id: str
    metric: str
    value: float
    value_sd: float | None
    epoch: int
    config: dict[str, Any]
    checkpoint: str | None
    folds: FoldAssignment
    data: dict[str, Any]

    def retrain_config(self) -> dict[str, Any]:
        """The config to retrain on train + val (no tile left to validate on): the best config trained for the
        ``epoch`` the mean over folds was best at."""
        return {**self.config, "epochs": self.epoch}

    def fold_states(self, map_location: Any = "cpu") -> list[dict[str, Any]]:
        """The k fold models of the best (trial, epoch): one engine checkpoint dict per fold (model, config, norm,
        ...: each usable as an ensemble member, e.g. ``tune_agb.engine.inference.member_from_state``).

        Raises:
            TuneAgbError: when the checkpoint is gone (Ray keeps the 2 best and the latest per trial) or is not the
                best epoch's k-fold checkpoint.
        """
        from tune_agb.engine.checkpoint import load_checkpoint_bytes
        from tune_agb.search.experiment import CHECKPOINT_FILE  # the trial folders' format is the search's

        if self.checkpoint is None:
            raise TuneAgbError(
                f"{self.experiment}/{BEST_FILE}: the checkpoint of trial {self.trial_id} epoch {self.epoch} was not "
                "kept; retrain on train+val instead of keeping the fold models"
            )
        source = join(self.checkpoint, CHECKPOINT_FILE)
        data = read_bytes(source)
        if data is None:
            raise TuneAgbError(f"{source}: not found (was the experiment moved or its checkpoints deleted?)")
        state = load_checkpoint_bytes(data, source=source, map_location=map_location)
        folds = state.get("folds")
        if not isinstance(folds, list) or len(folds) != self.folds.k:
            raise TuneAgbError(f"{source}: not the checkpoint of a {self.folds.k}-fold cross-validation")
        if int(state["epoch"]) != self.epoch or any(int(f["epoch"]) != self.epoch for f in folds):
            raise TuneAgbError(f"{source}: holds epoch {state['epoch']}, best.yaml says {self.epoch}")
        return folds


def read_cv_best(experiment: str) -> CVBest | None:
    """The best configuration of a cross-validated search and its folds (what ``final_train --experiment`` needs to
    retrain on train+val or keep the fold models); None for a search without ``cv``.

    Raises:
        TuneAgbError: one line when best.yaml or cv_folds.json cannot be read.
    """
    best = read_best(experiment)
    assert best is not None  # required=True
    if best.cv is None:
        return None
    experiment = experiment.rstrip("/")
    folds = read_folds(experiment)
    if folds is None:
        raise TuneAgbError(f"{experiment}/{CV_FOLDS_FILE}: not found, but best.yaml names a cv search")
    if best.epoch is None:
        raise TuneAgbError(f"{experiment}/{BEST_FILE}: 'epoch' is missing (expected the best epoch of a cv search)")
    sd = best.cv.get("value_sd")
    return CVBest(
        experiment=experiment,
        trial_id=best.trial_id,
        metric=str(best.metric),
        value=best.value,
        value_sd=None if sd is None else float(sd),
        epoch=best.epoch,
        config=dict(best.config),
        checkpoint=best.checkpoint,
        folds=folds,
        data=dict(best.data),
    )
