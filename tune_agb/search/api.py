"""The search's Python API: :func:`run` a search (or resume one) and get its results table and best configuration.

    >>> import tune_agb.search as search
    >>> outcome = search.run("search_spaces/demo.yaml", overrides={"experiment.num_samples": 8})
    >>> outcome.best.config, outcome.results.shape

``python -m tune_agb.search`` (:mod:`tune_agb.search.cli`) is a thin client of this module. Everything the caller
gives is validated before Ray starts (space, overrides, experiment folder, data); the experiment folder
``STORAGE/NAME`` (:mod:`tune_agb.search.experiment`) then holds Ray's state, ``search.yaml`` (the space, overrides
and data the search was started with), ``results.parquet`` and ``best.yaml``. Importing this module imports
neither Ray, torch nor pandas: they are imported once a search runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_agb.errors import TuneAgbError
from tune_agb.overrides import apply_overrides, format_overrides, parse_overrides

if TYPE_CHECKING:
    import pandas as pd

    from tune_agb.runs import Best
    from tune_agb.search.experiment import Experiment
    from tune_agb.search.space import SearchSpace

DEFAULT_STORAGE = "ray_results"


@dataclasses.dataclass
class SearchOutcome:
    """What a search left behind, as returned by :func:`run`.

    Attributes:
        results: the results table as written to ``results.parquet``: one row per (trial, epoch) with every
            reported metric, ``config/<name>`` per searched hyperparameter, ``wall_time`` (s), ``trial_path``...
        best: ``best.yaml`` as a :class:`tune_agb.runs.Best` (``trial_id``, ``metric``, ``mode``, ``value``,
            ``epoch``, the complete training ``config``, ``checkpoint`` folder, ``data``; ``cv`` with a cv section);
            None when no trial reported a finite value of the metric.
        experiment: the experiment folder ``STORAGE/NAME`` (absolute path, or ``s3://``/``gs://`` URI).
        space: the space the search ran (overrides applied).
        interrupted: SIGINT/Ctrl-C stopped the search (its state is saved; ``run(..., resume=True)`` continues it).
        errored: trials that failed after their retries.
        unfinished: trials started but neither finished nor failed (an interrupted search).
        incomplete: why the search is not complete, "" when it is (a spent time budget counts as complete).
        failures: one ``"TRIAL_ID: last error line"`` per failed trial.
        report_page: the HTML report page written into the experiment (its path, or URI for remote storage; None
            when it could not be drawn).
    """

    results: pd.DataFrame
    best: Best | None
    experiment: str
    space: SearchSpace
    interrupted: bool = False
    errored: int = 0
    unfinished: int = 0
    incomplete: str = ""
    failures: tuple[str, ...] = ()
    report_page: str | None = None

    @property
    def complete(self) -> bool:
        """Every trial ran (or the time budget was spent) and none is left to resume."""
        return not self.incomplete

    def summary(self, top: int = 5) -> str:
        """The printed summary: the ``top`` trials by their best epoch, failures, files, and the next command."""
        from tune_agb.location import is_uri
        from tune_agb.runs import BEST_FILE, RESULTS_FILE
        from tune_agb.search.experiment import CHECKPOINT_FILE, OPTUNA_JOURNAL, TENSORBOARD_DIR
        from tune_agb.search.results import summary
        from tune_agb.search.sync import mirror_dir

        space, exp = self.space, self.experiment
        lines = [f"\nbest trials by {space.metric} ({space.mode}, best epoch of each trial):"]
        lines.append(summary(self.results, space, top))
        if self.failures:
            lines.append(f"\n{len(self.failures)} trial(s) failed (after their retries):")
            lines += [f"  {f}" for f in self.failures]
        lines.append(f"\nresults: {exp}/{RESULTS_FILE}  best: {exp}/{BEST_FILE}")
        if self.report_page is not None:
            lines.append(f"report page: {self.report_page}")
        if is_uri(exp):
            local = mirror_dir(exp)
            lines.append(f"Optuna study: {exp}/{OPTUNA_JOURNAL}; here: optuna-dashboard {local}/{OPTUNA_JOURNAL}")
            lines.append(
                f"TensorBoard (HParams table, curves): tensorboard --logdir {exp}/{TENSORBOARD_DIR}; "
                f"here: tensorboard --logdir {local}/{TENSORBOARD_DIR}"
            )
        else:
            lines.append(f"Optuna study: optuna-dashboard {exp}/{OPTUNA_JOURNAL}")
            lines.append(f"TensorBoard (HParams table, curves): tensorboard --logdir {exp}/{TENSORBOARD_DIR}")
        if self.best is not None:
            b = self.best
            kept = f"checkpoint {b.checkpoint}/{CHECKPOINT_FILE}" if b.checkpoint else "its checkpoint was not kept"
            lines.append(f"best: trial {b.trial_id} epoch {b.epoch} {space.metric}={b.value:.4g} ({kept})")
            lines.append("\nnext, train the final model:")
            name = exp.rstrip("/").rsplit("/", 1)[-1]
            lines.append(f"  python -m tune_agb.final_train --experiment {exp} --out-dir runs/{name}-final")
        return "\n".join(lines)


@dataclasses.dataclass
class _Plan:
    """A search validated before Ray starts."""

    space: SearchSpace
    exp: Experiment
    input_dir: str
    label_dir: str
    record: dict[str, Any]


def run(
    space: str | Path | SearchSpace | Mapping[str, Any],
    *,
    input_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    storage: str | Path = DEFAULT_STORAGE,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    wandb: bool = False,
    quiet: bool = False,
) -> SearchOutcome:
    """Run a hyperparameter search (Ray Tune + Optuna + ASHA) over a search space, or resume one.

    Everything is validated before Ray starts: the space, the overrides, the experiment folder, the data (packed
    into the tile store once) and with a ``cv`` section the fold assignment. ``results.parquet`` and ``best.yaml``
    are (re)written when the search ends, also when it was interrupted.

    Args:
        space: a search-space YAML file (see ``search_spaces/``), a :class:`~tune_agb.search.space.SearchSpace`,
            or the same document as a mapping. Relative ``data``/``cv.manifest`` folders are relative to the file
            (to the current folder for a mapping).
        input_dir: tile inputs folder with ``train/`` and ``val/``; with ``label_dir``, overrides the space's
            ``data``. Neither, and no ``data`` in the space: the demo dataset (or on resume, the search's data).
        label_dir: tile labels folder with ``train/`` and ``val/``.
        storage: folder or ``s3://``/``gs://`` URI that holds experiments.
        name: the experiment's name (folder ``STORAGE/NAME``); default: the space file's name without suffix
            (required when ``space`` is not a file).
        resume: continue the search ``STORAGE/NAME`` (same space; overrides, if given, must equal the recorded).
        address: join a running Ray cluster (``auto`` or ``HOST:PORT``); None starts Ray here. Ignored when Ray is
            already initialised in this process (the search then uses that instance and leaves it running).
        overrides: changes to the space, ``{"experiment.num_samples": 12}`` or ``["experiment.num_samples=12"]``
            (values read as YAML), see :mod:`tune_agb.overrides`; recorded in ``search.yaml``.
        wandb: also log each trial to Weights & Biases (chosen at the start; kept by a resume).
        quiet: print nothing of the search's own (no Ray progress table either, for a new search).

    Returns:
        The :class:`SearchOutcome`: results table, best configuration, counts of failed/unfinished trials.

    Raises:
        TuneAgbError: one line naming what is wrong (space key, override, data folder, experiment folder,
            cluster resources) before Ray starts.
    """
    if wandb and importlib.util.find_spec("wandb") is None:
        raise TuneAgbError("--wandb: wandb is not installed (pip install 'tune_agb[wandb]')")
    # Saving experiment state after each checkpoint is what keeps --resume exact; Ray warns about it every epoch.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    plan = _prepare(space, input_dir, label_dir, str(storage), name, resume, overrides, quiet)
    from tune_agb.engine.train import init_state
    from tune_agb.runs import CV_FOLDS_FILE, write_folds
    from tune_agb.search.launch import (
        build_tuner_parts,
        check_cluster_resources,
        fit_noting_interrupt,
        init_ray,
        make_folds,
        make_trainable,
    )
    from tune_agb.store import DataSource

    say = (lambda line: None) if quiet else (lambda line: print(line, flush=True))
    space_, exp = plan.space, plan.exp
    base = space_.base_config()
    init_state(base)  # fixed init_weights: a missing or mismatched file is one error line before Ray starts
    # Validated and packed here, before Ray starts: bad tiles are one error line, and trials on this node find the
    # store ready (a trial on another node packs its own copy once).
    data = DataSource(plan.input_dir, plan.label_dir, splits=("train", "val"), in_channels=base.in_channels).pinned()
    # The folds too (cv): a bad cv section or too few blocks is one error line before Ray starts.
    folds, write = make_folds(space_, exp, data, plan.input_dir, resume, quiet)

    import ray
    from ray import tune

    own_ray = not ray.is_initialized()
    init_ray(address)
    try:
        check_cluster_resources(space_, ray.cluster_resources())
        trainable = make_trainable(space_, data, exp.uri, folds)
        ex = space_.settings["experiment"]
        what = f"{ex['num_samples']} trials, metric {space_.metric} {space_.mode}, data {plan.input_dir}"
        say(f"search: {exp.uri}  ({what})")
        if folds is not None:
            say(f"cv: {folds.k} folds of the train+val tiles, positions from {folds.positions} ({CV_FOLDS_FILE})")
            say("\n".join(f"  {line}" for line in folds.describe()))
            if write:
                write_folds(exp.uri, folds)
        if resume:
            if wandb:
                say("note: --wandb has no effect on --resume: the search keeps the logging it was started with")
            tuner = tune.Tuner.restore(exp.uri, trainable=trainable, resume_errored=True)
        else:
            exp.write_search(plan.record)
            tune_config, run_config, _ = build_tuner_parts(space_, exp, wandb=wandb, quiet=quiet)
            tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
        grid, interrupted = fit_noting_interrupt(tuner)
    finally:
        if own_ray:
            ray.shutdown()
    return _outcome(grid, plan, interrupted)


def resolved_config(
    space: str | Path | SearchSpace | Mapping[str, Any],
    *,
    input_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> dict[str, Any]:
    """The search space a :func:`run` with these arguments would search, as a plain YAML-ready mapping.

    Every section with its defaults filled in and the overrides applied; ``data`` holds the absolute tile folders
    the search would read (the demo dataset's, generated once into the cache, when none are given). Ray is not
    started. A resumed search runs with the space, overrides and data recorded in its ``search.yaml``.

    Raises:
        TuneAgbError: one line naming a bad key or value of the space or of an override.
    """
    _, _, resolved, _ = _load_space(space, overrides)
    inp, lab = _resolve_data(resolved, input_dir, label_dir)
    return {**resolved.to_dict(), "data": {"input_dir": inp, "label_dir": lab}}


# ---------------------------------------------------------------------------------------------------------------
def _load_space(
    space: str | Path | SearchSpace | Mapping[str, Any], overrides: Mapping[str, Any] | Sequence[str]
) -> tuple[SearchSpace, str | None, SearchSpace, dict[str, Any]]:
    """(the space as given, its file or None, the space with the overrides applied, the overrides)."""
    from tune_agb.engine.config import read_yaml_or_json
    from tune_agb.search.space import SearchSpace, parse_search_space

    if isinstance(space, SearchSpace):
        given, raw = space, space.to_dict()
        path = Path(space.source) if Path(space.source).is_file() else None
    elif isinstance(space, Mapping):
        raw = dict(space)
        given, path = parse_search_space(raw, source="search space"), None
    else:
        path = Path(space)
        raw = read_yaml_or_json(path, "search-space file")
        given = parse_search_space(raw, source=str(path))  # the file alone must be valid
    changes = parse_overrides(overrides)
    if not changes:
        return given, str(path) if path else None, given, changes
    # Validated under a name that says where the changed values come from; kept with the file's name as source
    # (relative data and manifest paths are relative to the file).
    label = f"{given.source} with {format_overrides(changes)}"
    resolved = parse_search_space(apply_overrides(raw, changes), source=label)
    return given, str(path) if path else None, dataclasses.replace(resolved, source=given.source), changes


def _resolve_data(space: SearchSpace, input_dir: str | Path | None, label_dir: str | Path | None) -> tuple[str, str]:
    """Tile folders as stored: the arguments, else the space's ``data`` (relative to its file), else the demo data.
    Local folders are made absolute; ``s3://``/``gs://`` URIs are kept as given."""
    from tune_agb.demo_data import data_dirs
    from tune_agb.location import is_uri, resolve

    data = space.settings["data"]
    base = Path(space.source).parent
    stored = None
    if data["input_dir"] is not None:
        stored = tuple(d if is_uri(d) else str(base / d) for d in (data["input_dir"], data["label_dir"]))
    inp, lab = data_dirs(input_dir, label_dir, stored)
    return resolve(inp), resolve(lab)


def _prepare(
    space: str | Path | SearchSpace | Mapping[str, Any],
    input_dir: str | Path | None,
    label_dir: str | Path | None,
    storage: str,
    name: str | None,
    resume: bool,
    overrides: Mapping[str, Any] | Sequence[str],
    quiet: bool,
) -> _Plan:
    """Validate the space, the overrides, the experiment folder and the data: all before Ray starts."""
    from tune_agb.location import check_bucket
    from tune_agb.search.experiment import Experiment

    given, path, resolved, changes = _load_space(space, overrides)
    if name is None:
        if path is None:
            raise TuneAgbError("name: give the experiment's name (the space is not a file to name it after)")
        name = Path(path).stem
    exp = Experiment.at(storage, name)
    check_bucket(exp.storage, label=f"--storage {exp.storage}")  # a wrong bucket or credentials: one line, now
    stored_data = None
    if resume:
        changes, stored_data = _check_resume(exp, given, changes, quiet)
        if changes:
            resolved = _load_space(given, changes)[2]
    elif exp.has_search() and _ray_state_exists(exp):
        raise TuneAgbError(f"{exp.uri}: a search already exists there (use --resume, or another --name)")
    if stored_data and input_dir is None and label_dir is None:
        inp, lab = stored_data["input_dir"], stored_data["label_dir"]
    else:
        inp, lab = _resolve_data(resolved, input_dir, label_dir)
    record = {
        "space_file": str(Path(path).resolve()) if path else None,
        "space": given.to_dict(),
        "overrides": changes,
        "data": {"input_dir": inp, "label_dir": lab},
    }
    return _Plan(resolved, exp, inp, lab, record)


def _check_resume(
    exp: Experiment, given: SearchSpace, changes: dict[str, Any], quiet: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check a resume against the search's ``search.yaml`` and repair Ray's state after a hard kill.

    Returns:
        The overrides the search was started with, and its data folders (None when not recorded).
    """
    from ray import tune

    from tune_agb.runs import SearchRecord
    from tune_agb.search.space import parse_search_space
    from tune_agb.search.state import fill_pruned_checkpoints, repair_experiment_state
    from tune_agb.search.sync import pull

    stored = exp.read_search()
    if stored is None or not tune.Tuner.can_restore(exp.uri):
        raise TuneAgbError(f"--resume: no search to resume at {exp.uri} (check --name and --storage)")
    # Re-parsed, so that settings added since the search started compare as their defaults.
    started = parse_search_space(stored["space"], source=f"{exp.uri} (stored space)").to_dict()
    if started != given.to_dict():
        diff = _first_difference(started, given.to_dict())
        raise TuneAgbError(
            f"--resume: {given.source} differs from the space {exp.uri} was started with (at {diff}); "
            f"resume with the same file, or start a new search with another --name"
        )
    # Searches started before --set recorded the convenience flags' names (num_samples: 3).
    recorded = SearchRecord.from_dict(stored, f"{exp.uri}/search.yaml").changes
    for path, value in changes.items():
        if recorded.get(path) != value:
            raise TuneAgbError(
                f"--resume: {format_overrides({path: value})} differs from the search's "
                f"{format_overrides({path: recorded.get(path)})} (settings cannot change on resume)"
            )
    for name in repair_experiment_state(exp.uri):
        if not quiet:
            print(f"resume: {name} was cut short by the interruption; restored it from its backup", flush=True)
    fill_pruned_checkpoints(exp.uri)
    pull(exp.uri)  # a remote experiment's journal and TensorBoard runs, into this machine's mirror of it
    return recorded, stored.get("data")


def _ray_state_exists(exp: Experiment) -> bool:
    """A search.yaml without Ray's tuner.pkl is a start that failed before the search began: not a search."""
    from ray import tune

    return bool(tune.Tuner.can_restore(exp.uri))


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *[k for k in b if k not in a]]:
            if k not in a or k not in b or a[k] != b[k]:
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return path or "top level"


def _outcome(grid: Any, plan: _Plan, interrupted: bool) -> SearchOutcome:
    """Copy a remote experiment's journal and TensorBoard runs there, write results.parquet, best.yaml and the report
    page; collect the outcome."""
    from tune_agb.report import write_report_or_warn
    from tune_agb.search.launch import unfinished_trials
    from tune_agb.search.results import refresh_results
    from tune_agb.search.sync import push_or_warn

    exp = plan.exp
    push_or_warn(exp.uri)
    df, best = refresh_results(exp.uri, plan.space, plan.input_dir, plan.label_dir)
    failures = []
    for result in grid:
        if result.error is not None:
            lines = [ln for ln in str(result.error).splitlines() if ln.strip()]
            trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
            failures.append(f"{trial_id}: {lines[-1].strip() if lines else type(result.error).__name__}")
    written = write_report_or_warn(exp.uri)
    page = str(written) if written is not None else None
    return SearchOutcome(
        results=df,
        best=best,
        experiment=exp.uri,
        space=plan.space,
        interrupted=interrupted,
        errored=grid.num_errors,
        unfinished=len(grid) - grid.num_terminated - grid.num_errors,
        incomplete="stopped by a signal" if interrupted else unfinished_trials(grid, plan.space),
        failures=tuple(failures),
        report_page=page,
    )
