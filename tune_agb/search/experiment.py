"""The experiment folder ``STORAGE/NAME`` on Ray's side: its location, Ray's trial folders and checkpoints.

``STORAGE`` is a local folder or an ``s3://``/``gs://`` URI (opened with pyarrow.fs); the folder holds::

    search.yaml, results.parquet,    tune_agb's own files: read and written by tune_agb.runs (search_dir)
    best.yaml, cv_folds.json
    tuner.pkl, *_state-*.json/.pkl   Ray's experiment state (with NAME.bak copies, see tune_agb.search.state)
    TRIAL/result.json                Ray's per-trial results (JSON lines)
    TRIAL/checkpoint_NNNNNN/         checkpoint.pt (the engine's state; with cv, ``folds``: one per fold) +
                                     results.jsonl (every report up to it)
    optuna.journal                   the Optuna study (named NAME), for optuna-dashboard (s3:// / gs://: copied
                                     from the driver's local mirror, see tune_agb.search.sync)
    tensorboard/                     HParams table and per-epoch curves, one run per trial (idem)
    report/index.html                the report page (tune_agb.report)
    wandb/                           W&B's files of the trials' runs, with --wandb (local experiments)

Every file tune_agb writes there is written next to its target and moved in place, so a reader (or a search
killed mid-write) never sees half a file. Importing this module imports neither Ray nor torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from tune_agb.errors import TuneAgbError
from tune_agb.location import Folder, open_location, read_path, resolve
from tune_agb.runs.search_dir import SEARCH_FILE, SearchRecord, read_search, write_search

RAY_RESULT_FILE = "result.json"  # Ray's, in each trial folder
# Every report so far (JSON lines), saved in each checkpoint folder: Ray's own result.json is written in a
# per-session local folder and copied to storage later, so a hard kill can lose or overwrite its rows; the
# checkpoint is uploaded inside tune.report(), so this log survives with it.
RESULTS_LOG = "results.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
OPTUNA_JOURNAL = "optuna.journal"  # Optuna's JournalStorage file of the study (study name = experiment name)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard runs written by tune_agb.search.logging_callbacks
CHECKPOINT_PREFIX = "checkpoint_"  # Ray's checkpoint folder names


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
    fs, root = open_location(experiment_uri)
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
    fs, root = open_location(experiment_uri)
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
            data = read_path(fs, source)
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


@dataclass(frozen=True)
class Experiment:
    """Where a search lives: ``uri`` = ``STORAGE/NAME``; ``storage``: an absolute path or an ``s3://``/``gs://`` URI."""

    storage: str
    name: str

    @classmethod
    def at(cls, storage: str, name: str) -> Experiment:
        """The experiment ``name`` under ``storage`` as given on the command line (local paths made absolute)."""
        return cls(resolve(storage), name)

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def fs(self) -> Folder:
        """The filesystem and the experiment folder's path in it (one error line naming ``--storage``)."""
        return open_location(self.uri, label=f"--storage {self.storage}")

    def has_search(self) -> bool:
        """Whether a search was started here (its ``search.yaml`` exists)."""
        fs, root = self.fs()
        return fs.get_file_info(f"{root}/{SEARCH_FILE}").type == pafs.FileType.File

    def read_search(self) -> dict[str, Any] | None:
        """The mapping of ``search.yaml`` (:class:`tune_agb.runs.SearchRecord`); None when there is none.

        Raises:
            TuneAgbError: when the file is not such a record.
        """
        record = read_search(self.uri)
        return None if record is None else record.to_dict()

    def write_search(self, record: dict[str, Any]) -> None:
        """Write ``search.yaml`` (creating the experiment folder) from its mapping (``space``, ``overrides``, ...)."""
        write_search(self.uri, SearchRecord.from_dict(record, f"{self.uri}/{SEARCH_FILE}"))
