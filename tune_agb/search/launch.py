"""Assembling a search for Ray Tune: the searcher, scheduler and configs, the trainable, the fold assignment, the
Ray connection and the fit that notes an interrupt. Used by :func:`tune_agb.search.run`; Ray, Optuna and the
trainable are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune_agb.errors import TuneAgbError
from tune_agb.location import is_uri
from tune_agb.runs import CV_FOLDS_FILE, read_folds
from tune_agb.search.experiment import OPTUNA_JOURNAL, TENSORBOARD_DIR, Experiment
from tune_agb.search.space import SearchSpace
from tune_agb.store import DataSource

if TYPE_CHECKING:
    from tune_agb.cv import FoldAssignment


def _say(line: str) -> None:
    print(line, flush=True)


def _silent(line: str) -> None:
    return None


def optuna_storage(exp: Experiment) -> Any:
    """The Optuna study's storage for a new search: a journal (Optuna's JournalStorage) that optuna-dashboard opens.

    A local experiment writes ``STORAGE/NAME/optuna.journal`` itself; an ``s3://``/``gs://`` one writes it in the
    driver's local mirror of the experiment and copies it to ``STORAGE/NAME/optuna.journal`` while the search runs
    (:class:`tune_agb.search.sync.MirroredJournalStorage`). The storage pickles as its file (local) or the
    experiment's URI (remote), so the searcher Ray restores on ``--resume`` reopens the same study. A journal
    already there is the leftover of a start that failed before its search began (a fresh start is refused where
    Ray's state exists): it is replaced.
    """
    if is_uri(exp.uri):
        from tune_agb.search.sync import MirroredJournalStorage, clear

        clear(exp.uri)
        return MirroredJournalStorage(exp.uri)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(exp.uri) / OPTUNA_JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def build_tuner_parts(
    space: SearchSpace, exp: Experiment, wandb: bool = False, quiet: bool = False
) -> tuple[Any, Any, Any]:
    """The TuneConfig, the RunConfig and the scheduler of a new search over ``space`` (Ray imported here).

    Args:
        space: the validated space (its overrides applied).
        exp: the experiment folder ``STORAGE/NAME``.
        wandb: log every trial to W&B too (group = the experiment name; see :class:`WandbCallback`).
        quiet: no notes and no Ray progress table (``RunConfig(verbose=0)``) on stdout.
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
    say = _silent if quiet else _say
    if is_uri(exp.uri):
        # Written on the driver, into its local mirror of the experiment; MirrorSync (after it) copies them there.
        from tune_agb.search.sync import MirrorSync, mirror_dir

        logdir = str(mirror_dir(exp.uri) / TENSORBOARD_DIR)
        callbacks.append(TensorBoardCallback(logdir, space.metric, space.mode, mirror_of=exp.uri))
        callbacks.append(MirrorSync(exp.uri))
    else:
        callbacks.append(TensorBoardCallback(f"{exp.uri}/{TENSORBOARD_DIR}", space.metric, space.mode))
    if wandb:
        # W&B writes its run files locally: in the experiment folder, or the current folder for s3:// / gs://
        wandb_dir = "." if is_uri(exp.uri) else exp.uri
        callbacks.append(WandbCallback(wandb_dir, group=exp.name))
        say(f"W&B: one run per trial in group {exp.name} ({wandb_mode()}; files in {wandb_dir}/wandb)")
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
        verbose=0 if quiet else 1,
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
    space: SearchSpace, exp: Experiment, data: DataSource, input_dir: str, resume: bool, quiet: bool = False
) -> tuple[FoldAssignment | None, bool]:
    """The fold assignment of a search with ``cv`` (None without): on ``--resume`` the one saved in the experiment
    (its normalisation recomputed if the tiles' store changed), else made from the tiles (one pass over them).

    Returns:
        The assignment and whether it must be (re)written to ``cv_folds.json``.
    """
    if space.cv is None:
        return None, False
    from tune_agb.cv import build_assignment, with_stats

    packed = data.open()
    keys = {s: k for s, k in data.keys}
    saved = read_folds(exp.uri) if resume else None
    if saved is not None:
        saved.check_tiles(packed.tiles, source=f"{exp.uri}/{CV_FOLDS_FILE}")
        if saved.data_keys == keys:
            return saved, False
        if not quiet:
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


def check_reachable(address: str, timeout_s: float = 5.0, flag: str = "--address") -> None:
    """Fail in seconds with one line (naming ``flag``, where the address came from) when HOST:PORT does not answer
    (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TuneAgbError(f"{flag} {address}: expected auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise TuneAgbError(
            f"{flag} {address}: no Ray head node answers there ({exc.strerror or exc}); "
            f"start one with `ray start --head --port {port}` or check the address"
        ) from None


# Ray's own per-trial loggers tune_agb reads (result.json) or leaves for users (progress.csv); not its TensorBoard one.
_RAY_LOGGERS = ("ray.tune.logger.CSVLoggerCallback", "ray.tune.logger.JsonLoggerCallback")


# Set by Ray's job supervisor for the entrypoint of a submitted job (`ray job submit`), with RAY_ADDRESS = the
# cluster's GCS address; Ray's own ray.init reads it to attach the job's runtime_env and metadata. Ray documents
# RAY_ADDRESS, not a "this is a job" flag: this name is the one the job supervisor sets (checked with Ray 2.60; the
# Ray Jobs test fails if a Ray release renames it).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_address() -> str | None:
    """The cluster a Ray job runs in (``RAY_ADDRESS``) when this process is a job's entrypoint, else None.

    A plain command with ``RAY_ADDRESS`` exported in the shell is not a job: it returns None there.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return address if address and RAY_JOB_ENV in os.environ else None


def init_ray(address: str | None) -> None:
    """Connect to Ray unless the caller already has: ``auto`` or ``HOST:PORT`` joins a running cluster; ``address``
    None joins the job's cluster when the process runs as a Ray job (``ray job submit -- python -m tune_agb.search
    ...``: Ray sets ``RAY_ADDRESS`` for it), else starts a private local instance here (even when ``RAY_ADDRESS`` or a
    ``ray start`` cluster exists); ``local`` always starts one here.

    Raises:
        TuneAgbError: one line when ``HOST:PORT`` does not answer or the cluster cannot be joined.
    """
    import ray

    # Ray Tune adds a TensorBoard logger to every search and then prints a hint pointing at its driver's staging
    # folder (/tmp/ray/session_...), not at the experiment. tune_agb writes its own TensorBoard runs to
    # STORAGE/NAME/tensorboard and reads Ray's result.json, so it asks for Ray's CSV and JSON loggers by name
    # (Ray's RAY_TUNE_CALLBACKS) and turns the automatic ones off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1). A user who
    # set TUNE_DISABLE_AUTO_CALLBACK_LOGGERS keeps their choice.
    if "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        extra = [cb for cb in os.environ.get("RAY_TUNE_CALLBACKS", "").split(",") if cb.strip()]
        os.environ["RAY_TUNE_CALLBACKS"] = ",".join([*extra, *_RAY_LOGGERS])
    if ray.is_initialized():  # a caller (tests, a notebook) already connected
        return
    flag = "--address"
    if not address and ray_job_address():
        address, flag = ray_job_address(), "RAY_ADDRESS (set by Ray for this job)"
    if not address or address == "local":
        # A private instance, started for this search and shut down with it: Ray turns token authentication on when
        # RAY_AUTH_MODE is unset and warns that it did. Ray reads the mode when it is imported, so this process can
        # only pick "disabled" here (its Ray processes inherit it). Export RAY_AUTH_MODE=token before the command to
        # keep tokens on a shared host. Joining a cluster (--address, a Ray job) keeps the cluster's mode and token.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address and address not in ("auto", "local") and "://" not in address:
        check_reachable(address, flag=flag)
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    # Trial processes log every checkpoint at INFO; the progress table and the error summary say what matters.
    kwargs["log_to_driver"] = False
    try:
        # "local" starts a fresh instance here even when a `ray start` cluster or RAY_ADDRESS exists: joining one
        # is what --address (or running as a Ray job) is for.
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TuneAgbError(f"{flag} {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]})") from None


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
