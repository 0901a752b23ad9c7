"""Keeping Ray's experiment state resumable after a hard kill.

Ray saves the experiment state atomically in a staging folder, then copies it into the storage folder file by file.
A process killed during that copy leaves a truncated file there, and ``Tuner.restore`` then gives up on the whole
run state (it starts over with a single trial). :class:`StateBackupCallback` keeps, for each state file, a copy of
its latest intact version (``NAME.bak``, written atomically, outside Ray's file patterns);
:func:`repair_experiment_state` puts the intact copy back before a resume and reports a state file it cannot
repair in one line. :func:`fill_pruned_checkpoints` gives a checkpoint that the saved state names but that Ray
pruned after the save an empty placeholder folder, so that Ray's restore does not fail the trial.
"""

from __future__ import annotations

import json
import pickle
import time
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

from tune_agb.errors import TuneAgbError
from tune_agb.location import open_location, read_path, write_path_atomic
from tune_agb.search.experiment import CHECKPOINT_PREFIX, checkpoint_folders

BACKUP_SUFFIX = ".bak"
# (prefix, suffix, format); search_gen_state-*.json is a pickle despite its name.
STATE_FILES = (
    ("searcher-state-", ".pkl", "pkl"),
    ("experiment_state-", ".json", "json"),
    ("search_gen_state-", ".json", "pkl"),
)


class StateBackupCallback(Callback):
    """Copy each intact, changed Ray state file of the experiment to ``NAME.bak`` (at most every ``every_s``).

    Args:
        experiment_uri: ``STORAGE/NAME`` (absolute path or URI).
        every_s: seconds between checks; runs in the driver after a controller step.
    """

    def __init__(self, experiment_uri: str, every_s: float = 1.0):
        self.experiment_uri = experiment_uri
        self.every_s = every_s
        # Own state, named apart from Ray's Callback attributes: when the last check ran, and the mtime of each
        # state file when it was last copied.
        self.last_check = 0.0
        self.copied: dict[str, int] = {}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last_check < self.every_s:
            return
        self.last_check = time.monotonic()
        self.backup()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.backup()

    def backup(self) -> None:
        """Copy each changed state file that parses to ``NAME.bak`` (atomically)."""
        try:
            fs, root = open_location(self.experiment_uri)
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except (OSError, TuneAgbError):
            return
        for info in infos:
            kind = _state_kind(info.base_name)
            if kind is None or self.copied.get(info.path) == info.mtime_ns:
                continue
            try:
                data = read_path(fs, info.path)
            except OSError:
                continue
            if data is None or not _parses(data, kind):  # caught mid-copy: keep the previous intact backup
                continue
            write_path_atomic(fs, f"{info.path}{BACKUP_SUFFIX}", data)
            self.copied[info.path] = info.mtime_ns

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_uri": self.experiment_uri, "every_s": self.every_s, "last_check": 0.0, "copied": {}}


def _state_kind(name: str) -> str | None:
    for prefix, suffix, kind in STATE_FILES:
        if name.startswith(prefix) and name.endswith(suffix):
            return kind
    return None


def _parses(data: bytes, kind: str) -> bool:
    try:
        if kind == "pkl":
            pickle.loads(data)
        else:
            json.loads(data)
    except (EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError, IndexError, TypeError):
        return False
    return True


def _intact(fs: pafs.FileSystem, path: str, kind: str) -> bytes | None:
    """The file's bytes when it can be read and parses, else None."""
    try:
        data = read_path(fs, path)
    except OSError:
        return None
    return data if data is not None and _parses(data, kind) else None


def _newest(fs: pafs.FileSystem, root: str, prefix: str, suffix: str) -> list[Any]:
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = [i for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix)]
    found = [i for i in found if i.base_name.endswith(suffix)]
    return sorted(found, key=lambda i: i.mtime_ns or 0)[-1:]


def repair_experiment_state(experiment_uri: str) -> list[str]:
    """Check the state files ``Tuner.restore`` reads; restore a cut searcher state from its backup.

    Returns:
        Names of the files that were repaired.

    Raises:
        TuneAgbError: when a state file is cut short and has no intact backup.
    """
    fs, root = open_location(experiment_uri)
    repaired = []
    for prefix, suffix, kind in STATE_FILES:
        for info in _newest(fs, root, prefix, suffix):
            if _intact(fs, info.path, kind) is not None:
                continue
            backup = _intact(fs, f"{info.path}{BACKUP_SUFFIX}", kind)
            if backup is not None:
                write_path_atomic(fs, info.path, backup)
                repaired.append(info.base_name)
                continue
            raise TuneAgbError(
                f"{info.path}: the search's saved state was cut short when it was interrupted and has no intact "
                "backup; it cannot be resumed (start a new search with another --name)"
            )
    return repaired


PLACEHOLDER_FILE = "pruned-checkpoint-placeholder.txt"


def fill_pruned_checkpoints(experiment_uri: str) -> int:
    """Give every pruned ``checkpoint_NNNNNN`` of a trial, below its newest stored one, an empty placeholder folder.

    Ray prunes a trial's checkpoints beyond ``num_to_keep`` as soon as a newer one is stored, but saves the
    experiment state only every few seconds. A hard kill in between leaves the saved state naming a pruned
    checkpoint as the trial's latest, and Ray's restore then fails that trial on every try ("does not exist on
    storage anymore"). With the folder there, Ray's existence check passes; the trainable restores from the newest
    intact checkpoint of the trial folder, found by content (a placeholder holds none). Before a resume only.

    Returns:
        The number of placeholders written.
    """
    fs, root = open_location(experiment_uri)
    made = 0
    for trial in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if trial.type != pafs.FileType.Directory:
            continue
        numbers = (i.base_name[len(CHECKPOINT_PREFIX) :] for i in checkpoint_folders(fs, trial.path))
        have = {int(n) for n in numbers if n.isdigit()}
        for k in sorted(set(range(max(have, default=0))) - have):
            folder = f"{trial.path}/{CHECKPOINT_PREFIX}{k:06d}"
            fs.create_dir(folder, recursive=True)
            with fs.open_output_stream(f"{folder}/{PLACEHOLDER_FILE}") as f:  # object stores have no empty folders
                f.write(b"pruned by Ray after its last saved state; written by tune_agb before a resume\n")
            made += 1
    return made
