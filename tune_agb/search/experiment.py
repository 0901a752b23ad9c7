"""The experiment folder ``STORAGE/NAME``: the one owner of its location, its file names and their formats.

``STORAGE`` is a local folder or an ``s3://``/``gs://`` URI (opened with pyarrow.fs); the folder holds::

    search.yaml                      the space, overrides and data folders the search was started with
    cv_folds.json                    with a cv section: every train/val tile's block and fold (tune_agb.cv)
    results.parquet, best.yaml       one row per trial and epoch; the best (trial, epoch), read by final_train
    tuner.pkl, *_state-*.json/.pkl   Ray's experiment state (with NAME.bak copies, see tune_agb.search.state)
    TRIAL/result.json                Ray's per-trial results (JSON lines)
    TRIAL/checkpoint_NNNNNN/         checkpoint.pt (the engine's state; with cv, ``folds``: one per fold) +
                                     results.jsonl (every report up to it)
    optuna.journal                   the Optuna study (named NAME; local experiments), for optuna-dashboard
    tensorboard/                     HParams table and per-epoch curves, one run per trial (local experiments)
    wandb/                           W&B's files of the trials' runs, with --wandb (local experiments)

Every file this package writes there is written next to its target and moved in place, so a reader (or a search
killed mid-write) never sees half a file. Importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from tune_agb.errors import TuneAgbError

if TYPE_CHECKING:  # torch: imported where folds are used, not with this module
    from tune_agb.cv import FoldAssignment

SEARCH_FILE = "search.yaml"
CV_FOLDS_FILE = "cv_folds.json"  # the fold of every train/val tile (tune_agb.cv.FoldAssignment.to_dict)
RESULTS_FILE = "results.parquet"
BEST_FILE = "best.yaml"
RAY_RESULT_FILE = "result.json"  # Ray's, in each trial folder
# Every report so far (JSON lines), saved in each checkpoint folder: Ray's own result.json is written in a
# per-session local folder and copied to storage later, so a hard kill can lose or overwrite its rows; the
# checkpoint is uploaded inside tune.report(), so this log survives with it.
RESULTS_LOG = "results.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
OPTUNA_JOURNAL = "optuna.journal"  # Optuna's JournalStorage file of the study (study name = experiment name)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard runs written by tune_agb.search.logging_callbacks
CHECKPOINT_PREFIX = "checkpoint_"  # Ray's checkpoint folder names
TMP_SUFFIX = ".tmp"

Folder = tuple[pafs.FileSystem, str]


def is_uri(location: str) -> bool:
    """Whether ``location`` names remote storage (``s3://``, ``gs://``, ...); ``file://`` and plain paths are local."""
    return "://" in location and not location.startswith("file://")


def resolve_storage(storage: str) -> str:
    """Local paths become absolute (trials run with their own folder as cwd); URIs are kept as given."""
    if is_uri(storage):
        return storage
    return str(Path(storage.removeprefix("file://")).expanduser().resolve())


def _filesystem(location: str) -> Folder:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    path = Path(location.removeprefix("file://")).expanduser().absolute()
    return pafs.LocalFileSystem(), str(path)


def open_storage(location: str, label: str | None = None) -> Folder:
    """The filesystem and the path in it of a local path or a URI.

    Args:
        location: a folder or file, local (made absolute) or ``s3://``/``gs://``.
        label: how errors name it (default: ``location``), e.g. ``--storage s3://bucket``.

    Raises:
        TuneAgbError: one line when the storage cannot be opened (unknown scheme, no credentials, ...).
    """
    try:
        return _filesystem(location)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TuneAgbError(f"{label or location}: cannot open it ({_first_line(exc)})") from None


def location_of(like: str, path: str) -> str:
    """A pyarrow filesystem path as a location like ``like``: a URI with its scheme, or an absolute local path."""
    if is_uri(like):
        return f"{like.split('://', 1)[0]}://{path}"
    return str(Path(path).resolve())


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` next to it first (``PATH.tmp``), then move it in place.

    A reader sees the old content or the new one, never part of it; a failed write leaves the old content.
    """
    tmp = f"{path}{TMP_SUFFIX}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_file(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of a file; None when there is no file at ``path`` (other read errors raise ``OSError``)."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_file(experiment_uri: str, name: str, data: bytes) -> None:
    """:func:`write_atomic` of ``STORAGE/NAME/name`` (the folder is created if needed)."""
    fs, root = open_storage(experiment_uri)
    fs.create_dir(root, recursive=True)
    write_atomic(fs, f"{root}/{name}", data)


def json_lines(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSON lines (the format of ``results.jsonl``)."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_json_lines(fs: pafs.FileSystem, path: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file ([] if it cannot be read); a line cut short by a killed process is skipped."""
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

    Rows come from Ray's ``result.json`` and from the report log saved in each checkpoint folder
    (``results.jsonl``; it survives a hard kill that loses ``result.json`` rows). A row reported twice (same epoch
    and ``wall_time``) appears once, with Ray's fields where both have it. ``checkpoint_dir_name`` is set to the
    kept checkpoint folder of the row's epoch (None if deleted); ``_trial_path`` is the trial folder.
    """
    fs, root = open_storage(experiment_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    except OSError:  # the experiment folder cannot be listed (yet)
        return []
    rows: list[dict[str, Any]] = []
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        found = {}
        for r in read_json_lines(fs, f"{entry.path}/{RAY_RESULT_FILE}"):
            if "trial_id" in r and "epoch" in r:
                found[(r["epoch"], r.get("wall_time"))] = r
        ckpt_of_epoch: dict[int, str] = {}
        for sub in sorted(checkpoint_folders(fs, entry.path), key=lambda i: i.base_name):
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


def checkpoint_folders(fs: pafs.FileSystem, trial_path: str) -> list[pafs.FileInfo]:
    """The ``checkpoint_*`` folders directly in a trial folder ([] when it is not there)."""
    infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True, recursive=False))
    return [i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]


def trial_folder(experiment_uri: str, trial_name: str) -> Folder:
    """The filesystem and path of the trial folder ``STORAGE/NAME/trial_name``."""
    fs, root = open_storage(experiment_uri)
    return fs, f"{root}/{trial_name}"


def newest_stored_checkpoint(
    fs: pafs.FileSystem, trial_path: str
) -> tuple[dict[str, Any], list[dict[str, Any]], str] | None:
    """The most advanced intact checkpoint stored in a trial's folder: ``(state, report log, folder path)``.

    Ray hands a restored trial the newest checkpoint recorded in its saved experiment state, which a hard kill can
    leave one or more epochs behind what the trial had already stored. This looks at every ``checkpoint_*`` folder
    of the trial and takes the one whose report log reaches the latest epoch (by content, not by folder name: after
    a resume Ray may reuse a folder name), skipping any that a kill left incomplete (unreadable checkpoint, or a
    log that does not end at the checkpoint's epoch). None when the folder holds no intact checkpoint.
    """
    from tune_agb.engine.checkpoint import load_checkpoint_bytes  # torch: only where a checkpoint is loaded

    try:
        folders = checkpoint_folders(fs, trial_path)
    except OSError:
        return None
    candidates = []
    for info in folders:
        log = [r for r in read_json_lines(fs, f"{info.path}/{RESULTS_LOG}") if "epoch" in r]
        if log:
            candidates.append((int(log[-1]["epoch"]), info.base_name, info.path, log))
    for epoch, _, path, log in sorted(candidates, reverse=True):
        source = f"{path}/{CHECKPOINT_FILE}"
        try:
            data = read_file(fs, source)
            if data is None:
                continue
            state = load_checkpoint_bytes(data, source=source)
        except (OSError, TuneAgbError):
            continue
        if int(state["epoch"]) == epoch:
            return state, log, path
    return None


def restore_point(folders: Iterable[Folder]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Where a (re)started trial goes on from: the engine state and report log of the newest stored checkpoint.

    Args:
        folders: the trial folders to look in, in order of preference; the first holding an intact checkpoint wins.

    Returns:
        ``(state, its report log up to its epoch)``, or ``(None, [])`` for a fresh start.
    """
    for fs, path in folders:
        found = newest_stored_checkpoint(fs, path)
        if found is not None:
            state, log, _ = found  # the log ends at the checkpoint's epoch (newest_stored_checkpoint checks it)
            return state, log
    return None, []


def write_checkpoint_folder(folder: str | Path, state: dict[str, Any], log_rows: list[dict[str, Any]]) -> None:
    """Fill a local checkpoint folder: ``checkpoint.pt`` (the engine's state) and ``results.jsonl`` (the log)."""
    from tune_agb.engine.checkpoint import save_checkpoint  # torch: only where a checkpoint is saved

    save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
    (Path(folder) / RESULTS_LOG).write_text(json_lines(log_rows))


def write_results_table(experiment_uri: str, table: pa.Table) -> None:
    """Write ``results.parquet`` (atomically)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_file(experiment_uri, RESULTS_FILE, buf.getvalue())


def write_best(experiment_uri: str, best: dict[str, Any]) -> None:
    """Write ``best.yaml`` (atomically): the contract with ``tune_agb.final_train --experiment``."""
    write_file(experiment_uri, BEST_FILE, yaml.safe_dump(best, sort_keys=False).encode())


def read_best(experiment: str) -> dict[str, Any]:
    """``STORAGE/NAME/best.yaml`` of a search (a local path or a pyarrow URI such as ``s3://...``).

    Raises:
        TuneAgbError: one line when it cannot be read, is not YAML, or has no ``config`` mapping.
    """
    path = f"{experiment.rstrip('/')}/{BEST_FILE}"
    try:
        fs, p = _filesystem(path)
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
    except (OSError, ValueError) as exc:
        raise TuneAgbError(
            f"{path}: cannot read the search's best.yaml ({_first_line(exc)}); is this a finished search?"
        ) from None
    try:
        best = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TuneAgbError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    if not isinstance(best, dict) or not isinstance(best.get("config"), dict):
        raise TuneAgbError(f"{path}: expected a mapping with a 'config' mapping")
    return best


def write_folds(experiment_uri: str, plan: FoldAssignment) -> None:
    """Write ``cv_folds.json`` (atomically): the search's fold assignment, reused by ``--resume`` and final_train."""
    write_file(experiment_uri, CV_FOLDS_FILE, json.dumps(plan.to_dict(), indent=1).encode())


def read_folds(experiment_uri: str) -> FoldAssignment | None:
    """The fold assignment saved in an experiment (a local path or a URI); None when it has none.

    Raises:
        TuneAgbError: one line when the file is there but is no fold assignment.
    """
    from tune_agb.cv import FoldAssignment

    fs, root = open_storage(experiment_uri)
    path = f"{root}/{CV_FOLDS_FILE}"
    data = read_file(fs, path)
    if data is None:
        return None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TuneAgbError(f"{experiment_uri}/{CV_FOLDS_FILE}: not valid JSON ({_first_line(exc)})") from None
    return FoldAssignment.from_dict(raw, source=f"{experiment_uri}/{CV_FOLDS_FILE}")


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

        if self.checkpoint is None:
            raise TuneAgbError(
                f"{self.experiment}/{BEST_FILE}: the checkpoint of trial {self.trial_id} epoch {self.epoch} was not "
                "kept; retrain on train+val instead of keeping the fold models"
            )
        fs, folder = open_storage(self.checkpoint)
        source = f"{self.checkpoint}/{CHECKPOINT_FILE}"
        try:
            data = read_file(fs, f"{folder}/{CHECKPOINT_FILE}")
        except OSError as exc:
            raise TuneAgbError(f"{source}: cannot read it ({_first_line(exc)})") from None
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
    cv = best.get("cv")
    if not isinstance(cv, dict):
        return None
    folds = read_folds(experiment.rstrip("/"))
    if folds is None:
        raise TuneAgbError(f"{experiment.rstrip('/')}/{CV_FOLDS_FILE}: not found, but best.yaml names a cv search")
    sd = cv.get("value_sd")
    return CVBest(
        experiment=experiment.rstrip("/"),
        trial_id=str(best.get("trial_id")),
        metric=str(best.get("metric")),
        value=float(best.get("value", math.nan)),
        value_sd=None if sd is None else float(sd),
        epoch=int(best["epoch"]),
        config=dict(best["config"]),
        checkpoint=best.get("checkpoint"),
        folds=folds,
        data=dict(best.get("data") or {}),
    )


@dataclass(frozen=True)
class Experiment:
    """Where a search lives: ``uri`` = ``STORAGE/NAME``; ``storage``: an absolute path or an ``s3://``/``gs://`` URI."""

    storage: str
    name: str

    @classmethod
    def at(cls, storage: str, name: str) -> Experiment:
        """The experiment ``name`` under ``storage`` as given on the command line (local paths made absolute)."""
        return cls(resolve_storage(storage), name)

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def fs(self) -> Folder:
        """The filesystem and the experiment folder's path in it (one error line naming ``--storage``)."""
        return open_storage(self.uri, label=f"--storage {self.storage}")

    def has_search(self) -> bool:
        """Whether a search was started here (its ``search.yaml`` exists)."""
        fs, root = self.fs()
        return fs.get_file_info(f"{root}/{SEARCH_FILE}").type == pafs.FileType.File

    def read_search(self) -> dict[str, Any] | None:
        """The record ``search.yaml`` holds (``space``, ``overrides``, ``data``); None when there is none.

        Raises:
            TuneAgbError: when the file is not such a record.
        """
        fs, root = self.fs()
        path = f"{root}/{SEARCH_FILE}"
        data = read_file(fs, path)
        if data is None:
            return None
        try:
            record = yaml.safe_load(data.decode())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TuneAgbError(f"{self.uri}/{SEARCH_FILE}: not valid YAML ({_first_line(exc)})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), dict) for k in ("space", "overrides")):
            raise TuneAgbError(f"{self.uri}/{SEARCH_FILE}: expected a mapping with 'space' and 'overrides' mappings")
        return record

    def write_search(self, record: dict[str, Any]) -> None:
        """Write ``search.yaml`` (creating the experiment folder)."""
        fs, root = self.fs()
        fs.create_dir(root, recursive=True)
        write_atomic(fs, f"{root}/{SEARCH_FILE}", yaml.safe_dump(record, sort_keys=False).encode())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
