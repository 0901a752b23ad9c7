"""The files of a remote experiment that are written on the driver first: the Optuna journal and TensorBoard's runs.

Optuna's JournalStorage appends to a file, and TensorBoard's writers append to event files: an object store
(``s3://``, ``gs://``) takes neither. For such an experiment both are written into a local mirror folder on the
driver (:func:`mirror_dir`: ``$TUNE_AGB_CACHE/experiments/NAME-HASH``, by default under ``~/.cache/tune_agb``) and
copied to ``STORAGE/NAME`` (:func:`push`): at most every second while the search runs (:class:`MirrorSync`), each
time Ray saves the searcher's state (the journal first, so the stored journal is never older than the stored
searcher), and when the search ends. ``--resume`` copies them back first (:func:`pull`), so a search resumes from
another folder, cache or machine with its study and TensorBoard runs whole. A local experiment is its own mirror and
nothing is copied.

Files copied: ``optuna.journal`` and everything under ``tensorboard/``, each written whole (atomically) when it
changed. Importing this module imports Optuna and Ray Tune (a search is running).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune import Callback

from tune_agb.errors import TuneAgbError
from tune_agb.location import failure, is_uri, join, open_location, read_path, write_atomic
from tune_agb.search.experiment import OPTUNA_JOURNAL, TENSORBOARD_DIR

MIRROR_DIR = "experiments"  # under the cache folder
TMP_SUFFIX = ".tmp"
# What was copied, per experiment: {relative path: (size, mtime_ns)}. Kept for this process (the driver): every
# pusher of an experiment (MirrorSync, the journal, the end of run()) shares it, so an unchanged file is copied once.
_pushed: dict[str, dict[str, tuple[int, int]]] = {}


def mirror_dir(experiment_uri: str) -> Path:
    """The local folder where the journal and TensorBoard runs of an experiment are written.

    The experiment folder itself for a local experiment; for ``s3://``/``gs://`` a folder of the cache named after
    the experiment and a hash of its URI (the same on every run on this machine).
    """
    if not is_uri(experiment_uri):
        return Path(experiment_uri)
    from tune_agb.demo_data import cache_dir

    uri = experiment_uri.rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return cache_dir() / MIRROR_DIR / f"{uri.rsplit('/', 1)[-1]}-{digest}"


def _local_files(mirror: Path, only: str | None = None) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of the mirrored files (``only``: that relative path alone)."""
    paths = [mirror / OPTUNA_JOURNAL] if only in (None, OPTUNA_JOURNAL) else []
    if only in (None, TENSORBOARD_DIR):
        paths += sorted(p for p in (mirror / TENSORBOARD_DIR).rglob("*") if p.is_file())
    out = {}
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file() and not p.name.endswith(TMP_SUFFIX):
            out[p.relative_to(mirror).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def push(experiment_uri: str, only: str | None = None) -> list[str]:
    """Copy the mirror's changed files to the experiment folder (nothing for a local experiment).

    Args:
        experiment_uri: ``STORAGE/NAME``.
        only: ``optuna.journal`` or ``tensorboard`` alone (default: both).

    Returns:
        The relative paths copied.

    Raises:
        TuneAgbError: one line naming the file that could not be written (what the store answered).
    """
    if not is_uri(experiment_uri):
        return []
    mirror = mirror_dir(experiment_uri)
    done = _pushed.setdefault(experiment_uri, {})
    copied = []
    for rel, stamp in _local_files(mirror, only).items():
        if done.get(rel) == stamp:
            continue
        data = (mirror / rel).read_bytes()
        write_atomic(join(experiment_uri, rel), data)
        done[rel] = (len(data), stamp[1]) if len(data) == stamp[0] else (-1, -1)  # grew while read: copy again
        copied.append(rel)
    return copied


def push_or_warn(experiment_uri: str, only: str | None = None) -> None:
    """:func:`push` during a search: a failed copy is one warning line (the next push tries again), never a failed
    search."""
    try:
        push(experiment_uri, only)
    except (TuneAgbError, OSError) as exc:
        print(f"warning: {experiment_uri}: could not copy the study/TensorBoard files there ({exc})", file=sys.stderr)


def pull(experiment_uri: str) -> list[str]:
    """Before a resume: copy the experiment's journal and TensorBoard files into the local mirror.

    A local copy that extends the stored one (this machine wrote it; the search stopped before its last copy) is
    kept; any other local copy is replaced by the stored one. Nothing is done for a local experiment.

    Returns:
        The relative paths written locally.

    Raises:
        TuneAgbError: one line when the stored files cannot be listed or read.
    """
    if not is_uri(experiment_uri):
        return []
    fs, root = open_location(experiment_uri)
    mirror = mirror_dir(experiment_uri)
    done: dict[str, tuple[int, int]] = {}  # files now the same here and there: not copied back by the next push
    try:
        infos = [fs.get_file_info(f"{root}/{OPTUNA_JOURNAL}")]
        infos += fs.get_file_info(pafs.FileSelector(f"{root}/{TENSORBOARD_DIR}", recursive=True, allow_not_found=True))
        written = []
        for info in infos:
            if info.type != pafs.FileType.File or info.base_name.endswith(TMP_SUFFIX):
                continue
            rel = info.path[len(root) :].lstrip("/")
            stored = read_path(fs, info.path) or b""
            local = mirror / rel
            mine = local.read_bytes() if local.is_file() else None
            if mine is None or not mine.startswith(stored):
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(local.name + TMP_SUFFIX)
                tmp.write_bytes(stored)
                os.replace(tmp, local)
                written.append(rel)
                mine = stored
            if mine == stored:
                done[rel] = (len(stored), local.stat().st_mtime_ns)
    except OSError as exc:
        raise failure(experiment_uri, "cannot copy its study/TensorBoard files here", exc) from None
    _pushed[experiment_uri] = done
    return written


def clear(experiment_uri: str) -> None:
    """Before a new search: remove the local mirror and a stored journal left by a start that failed before its
    search began (a fresh start is refused where Ray's state exists)."""
    if not is_uri(experiment_uri):
        return
    shutil.rmtree(mirror_dir(experiment_uri), ignore_errors=True)
    _pushed.pop(experiment_uri, None)
    fs, root = open_location(experiment_uri)
    try:
        if fs.get_file_info(f"{root}/{OPTUNA_JOURNAL}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{OPTUNA_JOURNAL}")
    except OSError as exc:
        raise failure(f"{experiment_uri}/{OPTUNA_JOURNAL}", "cannot replace it", exc) from None


class MirroredJournalStorage(JournalStorage):
    """Optuna's JournalStorage in the local mirror of a remote experiment, copied to ``STORAGE/NAME/optuna.journal``
    by :meth:`push`.

    Pickled (in Ray's searcher state and ``tuner.pkl``) as the experiment's URI alone: unpickled on a resume, it
    reopens the mirror of the machine it runs on, which :func:`pull` filled first.

    Args:
        experiment_uri: ``STORAGE/NAME`` (``s3://``, ``gs://``).
    """

    def __init__(self, experiment_uri: str):
        self.experiment_uri = experiment_uri
        path = mirror_dir(experiment_uri) / OPTUNA_JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.experiment_uri,))

    def push(self) -> None:
        """Copy the journal to the experiment folder if it changed (a failure is a warning line)."""
        push_or_warn(self.experiment_uri, OPTUNA_JOURNAL)


class MirrorSync(Callback):
    """Copy a remote experiment's journal and TensorBoard files there while the search runs (at most every
    ``every_s`` seconds, after a controller step) and when it ends.

    Args:
        experiment_uri: ``STORAGE/NAME`` (``s3://``, ``gs://``).
        every_s: seconds between copies.
    """

    def __init__(self, experiment_uri: str, every_s: float = 1.0):
        self.experiment_uri = experiment_uri
        self.every_s = every_s
        self.last_push = 0.0  # own state, named apart from Ray's Callback attributes

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.last_push >= self.every_s:
            self.last_push = time.monotonic()
            push_or_warn(self.experiment_uri)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        push_or_warn(self.experiment_uri)

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_uri": self.experiment_uri, "every_s": self.every_s, "last_push": 0.0}
