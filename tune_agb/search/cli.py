"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over a search-space file.

    python -m tune_agb.search --space search_spaces/demo.yaml

Everything the user gives is validated before Ray starts (space file, flags, data folders). The experiment folder
``STORAGE/NAME`` (:mod:`tune_agb.search.experiment`) holds Ray's state (``tuner.pkl``, trial folders with
checkpoints) plus ``search.yaml`` (the space and settings it was started with), ``results.parquet`` and
``best.yaml``, and with a ``cv`` section ``cv_folds.json`` (the fold of every train/val tile, made before Ray starts
and reused by ``--resume``); ``--resume`` continues it. Ray and the trainable are imported only once a search runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_agb.engine.config import read_yaml_or_json
from tune_agb.errors import TuneAgbError
from tune_agb.location import is_uri
from tune_agb.runs import BEST_FILE, CV_FOLDS_FILE, RESULTS_FILE, read_folds, write_folds
from tune_agb.search.experiment import CHECKPOINT_FILE, OPTUNA_JOURNAL, TENSORBOARD_DIR, Experiment
from tune_agb.search.space import SearchSpace, parse_search_space
from tune_agb.store import DataSource

if TYPE_CHECKING:
    from tune_agb.folds import FoldAssignment

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "ray_results"
# CLI override -> (section, key) of the space file.
OVERRIDES: dict[str, tuple[str, str]] = {
    "num_samples": ("experiment", "num_samples"),
    "max_concurrent": ("experiment", "max_concurrent"),
    "time_budget": ("experiment", "time_budget_s"),
    "max_failures": ("experiment", "max_failures"),
    "cpus_per_trial": ("resources", "cpu"),
    "gpus_per_trial": ("resources", "gpu"),
    "seed": ("searcher", "seed"),
}


def apply_overrides(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Put the CLI overrides into the raw space document (validated together with it afterwards)."""
    raw = {**raw}
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            raw[section] = {**(raw.get(section) or {}), key: value}
    return raw


def optuna_storage(exp: Experiment) -> Any:
    """The Optuna study's storage for a new search: the journal file ``STORAGE/NAME/optuna.journal``.

    None (Optuna's in-memory storage, pickled with Ray's searcher state) for an ``s3://``/``gs://`` experiment. The
    JournalStorage pickles as its file path, so the searcher Ray restores on ``--resume`` reopens the same file and
    study. A journal already there is the leftover of a start that failed before its search began (a fresh start
    is refused where Ray's state exists): it is replaced.
    """
    if is_uri(exp.uri):
        print(f"note: the Optuna study is kept in memory only ({exp.uri} is not a local folder)", flush=True)
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(exp.uri) / OPTUNA_JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def build_tuner_parts(space: SearchSpace, exp: Experiment, wandb: bool = False) -> tuple[Any, Any, Any]:
    """The searcher, the scheduler and the TuneConfig/RunConfig for a space (import Ray lazily).

    ``wandb``: log every trial to W&B too (group = the experiment name; see :class:`WandbCallback`).
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from tune_agb.search.asha import ResumableASHA
    from tune_agb.search.logging_callbacks import StudySearch, TensorBoardCallback, WandbCallback, wandb_mode
    from tune_agb.search.state import StateBackupCallback

    ex, sc, se = space.settings["experiment"], space.settings["scheduler"], space.settings["searcher"]
    sampler = space.sampler()
    # With a define-by-run space OptunaSearch ignores TuneConfig's metric/mode: it needs its own.
    searcher = StudySearch(
        space=space.define_by_run,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=list(se["points_to_evaluate"]) or None,
        sampler=sampler,
        storage=optuna_storage(exp),
        study_name=exp.name,
    )
    if sc["type"] == "asha":
        scheduler = ResumableASHA(
            exp.uri,
            max_t=sc["max_t"],
            grace_period=sc["grace_period"],
            reduction_factor=sc["reduction_factor"],
            brackets=sc["brackets"],
        )
    else:
        scheduler = FIFOScheduler()
    callbacks: list[Any] = [StateBackupCallback(exp.uri)]
    if is_uri(exp.uri):
        print(f"note: no TensorBoard HParams logs for {exp.uri} (written for local experiments only)", flush=True)
    else:
        callbacks.append(TensorBoardCallback(f"{exp.uri}/{TENSORBOARD_DIR}", space.metric, space.mode))
    if wandb:
        # W&B writes its run files locally: in the experiment folder, or the current folder for s3:// / gs://
        wandb_dir = "." if is_uri(exp.uri) else exp.uri
        callbacks.append(WandbCallback(wandb_dir, group=exp.name))
        print(f"W&B: one run per trial in group {exp.name} ({wandb_mode()}; files in {wandb_dir}/wandb)", flush=True)
    tune_config = tune.TuneConfig(
        metric=space.metric,
        mode=space.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=ex["num_samples"],
        max_concurrent_trials=ex["max_concurrent"],
        time_budget_s=ex["time_budget_s"],
    )
    run_config = tune.RunConfig(
        name=exp.name,
        storage_path=exp.storage,
        failure_config=tune.FailureConfig(max_failures=ex["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=space.metric, checkpoint_score_order=space.mode
        ),
        stop={"epoch": sc["max_t"]},
        callbacks=callbacks,
        verbose=1,
    )
    return tune_config, run_config, scheduler


def make_trainable(
    space: SearchSpace, data: DataSource, experiment_uri: str | None = None, folds: FoldAssignment | None = None
) -> Any:
    """The trainable with the data's location (not the tiles: each trial opens the packed store itself), the fold
    assignment of a cross-validated search (a few numbers per tile) and the trial's resources attached."""
    from ray import tune

    from tune_agb.search.trainable import search_trial  # Ray and torch: imported only to run a search

    if space.cv is not None and folds is None:
        raise TuneAgbError(f"{space.source}: cv: the search needs its fold assignment (see make_folds)")
    res = space.settings["resources"]
    fn = tune.with_parameters(
        search_trial,
        data=data,
        base=space.base_config().to_dict(),
        cpus=res["cpu"],
        gpu_fraction=res["gpu"],
        experiment_uri=experiment_uri,
        folds=folds,
    )
    return tune.with_resources(fn, {"cpu": res["cpu"], "gpu": res["gpu"]})


def cv_settings(space: SearchSpace) -> dict[str, Any]:
    """The space's ``cv`` section with ``manifest`` made absolute (relative to the space file, like ``data``)."""
    cv = dict(space.cv or {})
    manifest = cv.get("manifest")
    if manifest and "://" not in manifest and not Path(manifest).is_absolute():
        cv["manifest"] = str((Path(space.source).parent / manifest).resolve())
    return cv


def make_folds(
    space: SearchSpace, exp: Experiment, data: DataSource, input_dir: str, resume: bool
) -> tuple[FoldAssignment | None, bool]:
    """The fold assignment of a search with ``cv`` (None without): on ``--resume`` the one saved in the experiment
    (its normalisation recomputed if the tiles' store changed), else made from the tiles (one pass over them).

    Returns:
        The assignment and whether it must be (re)written to ``cv_folds.json``.
    """
    if space.cv is None:
        return None, False
    from tune_agb.folds import build_assignment, with_stats

    packed = data.open()
    keys = {s: k for s, k in data.keys}
    saved = read_folds(exp.uri) if resume else None
    if saved is not None:
        saved.check_tiles(packed.tiles, source=f"{exp.uri}/{CV_FOLDS_FILE}")
        if saved.data_keys == keys:
            return saved, False
        print(f"cv: the tiles' store changed since the search started; fold normalisation recomputed ({exp.uri})")
        return with_stats(dataclasses.replace(saved, data_keys=keys), packed.tiles), True
    plan = build_assignment(cv_settings(space), packed.tiles, input_dir, keys, source=space.source)
    return plan, True


def check_cluster_resources(space: SearchSpace, cluster: dict[str, float]) -> None:
    """Fail before the search when no node could ever run a trial (Ray would leave it PENDING forever)."""
    res = space.settings["resources"]
    if res["gpu"] > 0 and cluster.get("GPU", 0) <= 0:
        raise TuneAgbError(
            f"{space.source}: resources.gpu={res['gpu']} per trial, but the Ray cluster has no GPU "
            "(use --gpus-per-trial 0 to search on CPUs)"
        )
    if res["gpu"] > cluster.get("GPU", 0):
        raise TuneAgbError(f"resources.gpu={res['gpu']} per trial, but the cluster has only {cluster.get('GPU')} GPUs")
    if res["cpu"] > cluster.get("CPU", 0):
        raise TuneAgbError(
            f"resources.cpu={res['cpu']} per trial, but the cluster has only {cluster.get('CPU', 0):g} CPUs "
            "(lower --cpus-per-trial)"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune_agb.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="search-space YAML file (see search_spaces/)")
    p.add_argument("--input-dir", help="tile inputs folder with train/ and val/ (default: space data, else demo)")
    p.add_argument("--label-dir", help="tile labels folder with train/ and val/")
    p.add_argument("--name", help="experiment name (default: the space file's name without .yaml)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder or s3:// / gs:// URI for experiments")
    p.add_argument("--resume", action="store_true", help="continue the experiment STORAGE/NAME")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT (default: start one here)")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; 0.25 puts four trials on a card")
    p.add_argument("--time-budget", type=float, help="stop starting/continuing trials after this many seconds")
    p.add_argument("--max-failures", type=int, help="retries of a failing trial from its checkpoint")
    p.add_argument("--seed", type=int, help="searcher seed")
    p.add_argument("--top", type=int, default=5, help="rows of the best-trials table")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log each trial to Weights & Biases (group = NAME; offline unless WANDB_API_KEY is set; "
        "chosen at the start, kept by --resume)",
    )
    return p.parse_args(argv)


def resolve_data(args: argparse.Namespace, space: SearchSpace) -> tuple[str, str]:
    from tune_agb.demo import data_dirs

    data = space.settings["data"]
    base = Path(space.source).parent
    # Space-file folders are relative to the space file, so a space works from any cwd.
    stored = (base / data["input_dir"], base / data["label_dir"]) if data["input_dir"] is not None else None
    inp, lab = data_dirs(args.input_dir, args.label_dir, stored)
    return str(inp.resolve()), str(lab.resolve())


def prepare(args: argparse.Namespace) -> tuple[SearchSpace, Experiment, str, str, dict[str, Any]]:
    """Validate the space, the flags, the experiment folder and the data: all before Ray starts."""
    space_path = Path(args.space)
    raw = read_yaml_or_json(space_path, "search-space file")
    file_space = parse_search_space(raw, source=str(space_path))  # the file alone must be valid
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    exp = Experiment.at(args.storage, args.name or space_path.stem)
    if args.resume:
        stored = exp.read_search()
        from ray import tune

        if stored is None or not tune.Tuner.can_restore(exp.uri):
            raise TuneAgbError(f"--resume: no search to resume at {exp.uri} (check --name and --storage)")
        # Re-parsed, so that settings added since the search started compare as their defaults.
        started = parse_search_space(stored["space"], source=f"{exp.uri} (stored space)").to_dict()
        if started != file_space.to_dict():
            diff = _first_difference(started, file_space.to_dict())
            raise TuneAgbError(
                f"--resume: {space_path} differs from the space {exp.uri} was started with (at {diff}); "
                f"resume with the same file, or start a new search with another --name"
            )
        for k, v in overrides.items():
            if stored["overrides"].get(k) != v:
                raise TuneAgbError(
                    f"--resume: --{k.replace('_', '-')} {v} differs from the search's {stored['overrides'].get(k)} "
                    "(settings cannot change on resume)"
                )
        overrides = dict(stored["overrides"])
        from tune_agb.search.state import fill_pruned_checkpoints, repair_experiment_state

        for name in repair_experiment_state(exp.uri):
            print(f"resume: {name} was cut short by the interruption; restored it from its backup", flush=True)
        fill_pruned_checkpoints(exp.uri)
    elif exp.has_search() and _ray_state_exists(exp):
        raise TuneAgbError(f"{exp.uri}: a search already exists there (use --resume, or another --name)")
    for k, v in overrides.items():
        setattr(args, k, v)
    space = parse_search_space(apply_overrides(raw, args), source=str(space_path))
    input_dir, label_dir = resolve_data(args, space)
    if args.resume and stored.get("data") and (args.input_dir is None and args.label_dir is None):
        input_dir, label_dir = stored["data"]["input_dir"], stored["data"]["label_dir"]
    record = {
        "space_file": str(space_path.resolve()),
        "space": file_space.to_dict(),
        "overrides": overrides,
        "data": {"input_dir": input_dir, "label_dir": label_dir},
    }
    return space, exp, input_dir, label_dir, record


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


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with one line when HOST:PORT does not answer (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TuneAgbError(f"--address {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise TuneAgbError(
            f"--address {address}: no Ray head node answers there ({exc.strerror or exc}); "
            f"start one with `ray start --head --port {port}` or check the address"
        ) from None


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():  # a caller (tests, a notebook) already connected
        return
    if address and address not in ("auto", "local") and "://" not in address:
        check_reachable(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # Trial processes log every checkpoint at INFO; the progress table and the error summary say what matters.
    kwargs["log_to_driver"] = False
    try:
        # "local" starts a fresh instance here even when a `ray start` cluster or RAY_ADDRESS exists: joining one
        # is what --address is for.
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TuneAgbError(f"--address {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]})") from None


def run_search(args: argparse.Namespace) -> int:
    """Run (or resume) a search; return 0 when at least one trial reported a result."""
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise TuneAgbError("--wandb: wandb is not installed (pip install 'tune_agb[wandb]')")
    space, exp, input_dir, label_dir, record = prepare(args)
    base = space.base_config()
    from tune_agb.engine.train import init_state

    init_state(base)  # fixed init_weights: a missing or mismatched file is one error line before Ray starts
    # Validated and packed here, before Ray starts: bad tiles are one error line, and trials on this node find the
    # store ready (a trial on another node packs its own copy once).
    data = DataSource(str(input_dir), str(label_dir), splits=("train", "val"), in_channels=base.in_channels).pinned()
    # The folds too (cv): a bad cv section or too few blocks is one error line before Ray starts.
    folds, write = make_folds(space, exp, data, input_dir, args.resume)

    import ray
    from ray import tune

    own_ray = not ray.is_initialized()
    init_ray(args.address)
    try:
        check_cluster_resources(space, ray.cluster_resources())
        trainable = make_trainable(space, data, exp.uri, folds)
        print(
            f"search: {exp.uri}  ({space.settings['experiment']['num_samples']} trials, metric {space.metric} "
            f"{space.mode}, data {input_dir})",
            flush=True,
        )
        if folds is not None:
            print(f"cv: {folds.k} folds of the train+val tiles, positions from {folds.positions} ({CV_FOLDS_FILE})")
            print("\n".join(f"  {line}" for line in folds.describe()), flush=True)
            if write:
                write_folds(exp.uri, folds)
        if args.resume:
            if args.wandb:
                print("note: --wandb has no effect on --resume: the search keeps the logging it was started with")
            tuner = tune.Tuner.restore(exp.uri, trainable=trainable, resume_errored=True)
        else:
            exp.write_search(record)
            tune_config, run_config, _ = build_tuner_parts(space, exp, wandb=args.wandb)
            tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
        grid, interrupted = fit_noting_interrupt(tuner)
    finally:
        if own_ray:
            ray.shutdown()
    code = report(grid, space, exp, input_dir, label_dir, args.top)
    unfinished = "stopped by a signal" if interrupted else unfinished_trials(grid, space)
    if unfinished:
        resume = f"python -m tune_agb.search --space {args.space} --name {exp.name} --storage {exp.storage} --resume"
        print(f"\nsearch interrupted ({unfinished}); results so far are written. Continue with:\n  {resume}")
        return 130
    return code


def fit_noting_interrupt(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether Ctrl-C/SIGINT ended it early (then fit saves the state and returns normally).

    Tune swaps in its own SIGINT handler for the run and puts the previous one back only when the signal arrives,
    so a marker handler installed here is back in place exactly when the run was interrupted.
    """
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def marker(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, marker)
    try:
        grid = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)
    return grid, interrupted


def unfinished_trials(grid: Any, space: SearchSpace) -> str:
    """Why the search is not complete (empty when it is): trials not ended, or fewer trials than num_samples.

    A time budget that ran out counts as complete: that is the budget doing its job.
    """
    started = len(grid)
    open_ = started - grid.num_terminated - grid.num_errors
    if open_:
        return f"{open_} trial(s) not finished"
    n = space.settings["experiment"]["num_samples"]
    if started < n and space.settings["experiment"]["time_budget_s"] is None:
        return f"{started} of {n} trials started"
    return ""


def report(grid: Any, space: SearchSpace, exp: Experiment, input_dir: str, label_dir: str, top: int = 5) -> int:
    """Write results.parquet and best.yaml, print the best trials, the failures and the final-train command."""
    from tune_agb.search.results import refresh_results, summary

    df, best = refresh_results(exp.uri, space, input_dir, label_dir)
    print(f"\nbest trials by {space.metric} ({space.mode}, best epoch of each trial):")
    print(summary(df, space, top))
    failed = []
    for result in grid:
        if result.error is not None:
            lines = [ln for ln in str(result.error).splitlines() if ln.strip()]
            trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
            failed.append(f"  {trial_id}: {lines[-1].strip() if lines else type(result.error).__name__}")
    if failed:
        print(f"\n{len(failed)} trial(s) failed (after their retries):")
        print("\n".join(failed))
    print(f"\nresults: {exp.uri}/{RESULTS_FILE}  best: {exp.uri}/{BEST_FILE}")
    if not is_uri(exp.uri):
        from tune_agb.report import write_report_or_warn

        page = write_report_or_warn(exp.uri)
        if page is not None:
            print(f"report page: {page}")
        print(f"Optuna study: optuna-dashboard {exp.uri}/{OPTUNA_JOURNAL}")
        print(f"TensorBoard (HParams table, curves): tensorboard --logdir {exp.uri}/{TENSORBOARD_DIR}")
    if best is None:
        print("no trial reported a finite result; nothing to train", file=sys.stderr)
        return 1
    print(
        f"best: trial {best.trial_id} epoch {best.epoch} {space.metric}={best.value:.4g} "
        f"(checkpoint {best.checkpoint}/{CHECKPOINT_FILE})"
    )
    print("\nnext, train the final model:")
    print(f"  python -m tune_agb.final_train --experiment {exp.uri} --out-dir runs/{exp.name}-final")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Saving experiment state after each checkpoint is what keeps --resume exact; Ray warns about it every epoch.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return run_search(args)
