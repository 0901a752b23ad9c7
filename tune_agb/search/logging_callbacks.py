"""What a search records for people to look at: the Optuna study, TensorBoard's HParams table and curves, W&B.

:class:`StudySearch` is Ray's OptunaSearch keeping the study complete: each Optuna trial carries its Ray trial id
(user attribute ``ray_trial_id``), and a Ray trial that errored (Optuna: FAIL) and then finished after ``--resume``
is added to the study as a COMPLETE trial with its parameters and value (Optuna cannot change a finished trial).

:class:`TensorBoardCallback` writes under ``STORAGE/NAME/tensorboard/`` (for an ``s3://``/``gs://`` experiment into
the driver's local mirror of it, copied there by :mod:`tune_agb.search.sync`): one run per trial
(``tensorboard/TRIAL_ID``) with the trial's hyperparameters (HParams session), each reported metric per epoch
(``val_rmse``, ``val_r2``, ``train_loss``, ``lr``, ...) and the best value of the search metric so far
(``hparams/best_val_rmse``); the run ``tensorboard/`` itself holds the HParams experiment (every hyperparameter and
metric seen). The table shows, per trial, the best and the last (final) value of each metric.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from tune_agb.search import ray_internals

# Reported keys logged per epoch: the engine's metrics (Ray's bookkeeping fields are left out).
METRIC_PREFIXES = ("val_", "train_")
METRIC_KEYS = ("lr",)
BEST_PREFIX = "hparams/best_"


class StudySearch(OptunaSearch):
    """OptunaSearch that tags Optuna trials with their Ray trial id and records trials finished after an error.

    With a storage that has a ``push()`` (:class:`tune_agb.search.sync.MirroredJournalStorage`, the study of a remote
    experiment), the journal is copied to the experiment each time Ray saves the searcher's state, just before.
    """

    def __init__(self, *args: Any, storage: Any = None, **kwargs: Any):
        super().__init__(*args, storage=storage, **kwargs)
        self.mirrored_journal = storage if callable(getattr(storage, "push", None)) else None

    def save(self, checkpoint_path: str) -> None:
        # Journal first: the stored journal is never older than the stored searcher state that refers to its trials.
        if getattr(self, "mirrored_journal", None) is not None:
            self.mirrored_journal.push()
        super().save(checkpoint_path)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = ray_internals.optuna_trial(self, trial_id)
        if config is not None and ot_trial is not None:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = (result or {}).get(self.metric)
        done = ray_internals.optuna_completed(self, trial_id)
        if done and not error and isinstance(value, int | float) and value == value:
            import optuna

            study = ray_internals.optuna_study(self)
            number = ray_internals.optuna_trial(self, trial_id).number
            (told,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
            recorded: set[str] = self.__dict__.setdefault("_finished_after_error", set())
            if told.state == optuna.trial.TrialState.FAIL and trial_id not in recorded:
                # errored, then restarted by --resume, and finished
                recorded.add(trial_id)
                study.add_trial(
                    optuna.trial.create_trial(
                        params=told.params,
                        distributions=told.distributions,
                        value=float(value),
                        intermediate_values=told.intermediate_values,
                        user_attrs=told.user_attrs,
                    )
                )
                return
        super().on_trial_complete(trial_id, result, error)


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A trial's config as flat ``{name: int | float | str | bool}`` (nested keys joined by ``/``, None dropped)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{name}/"))
        elif isinstance(v, bool | int | float | str):
            out[name] = v
        elif v is not None:
            out[name] = str(v)
    return out


def epoch_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric engine metrics of one report."""
    wanted = {k: v for k, v in result.items() if k.startswith(METRIC_PREFIXES) or k in METRIC_KEYS}
    return {k: float(v) for k, v in wanted.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoardCallback(Callback):
    """Write the HParams table and per-epoch scalars of a search under ``logdir`` (a local folder).

    Args:
        logdir: ``STORAGE/NAME/tensorboard``; for a remote experiment, the local mirror's (see ``mirror_of``).
        metric, mode: the search metric (its best-so-far is logged as ``hparams/best_METRIC``).
        mirror_of: the remote experiment (``s3://``/``gs://``) whose local mirror ``logdir`` is in: an unpickled
            callback (a resume, maybe on another machine) writes to this machine's mirror of it
            (:func:`tune_agb.search.sync.mirror_dir`).

    Picklable (Ray keeps the callbacks in ``tuner.pkl``): open writers are not pickled and are reopened after a
    resume, purging the epochs a resumed trial runs again.
    """

    def __init__(self, logdir: str, metric: str, mode: str, mirror_of: str | None = None):
        self.logdir = logdir
        self.mirror_of = mirror_of
        self.metric = metric
        self.mode = mode
        self.writers: dict[str, Any] = {}
        self.best: dict[str, float] = {}
        self.hparams_seen: dict[str, Any] = {}  # every hyperparameter seen, with a sample value
        self.metric_tags: set[str] = set()
        self.experiment_written: tuple[frozenset[str], frozenset[str]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["writers"] = {}
        state["experiment_written"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.__dict__.setdefault("mirror_of", None) is not None:
            from tune_agb.search.sync import mirror_dir

            self.logdir = str(mirror_dir(self.mirror_of) / Path(self.logdir).name)

    def better_than(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def writer_for(self, trial: Any, step: int) -> Any:
        trial_id = str(trial.trial_id)
        if trial_id not in self.writers:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            run = Path(self.logdir) / trial_id
            if trial_id not in self.best:
                previous = _previous_best(run, f"{BEST_PREFIX}{self.metric}", before_step=step)
                if previous is not None:
                    self.best[trial_id] = previous
            # purge_step: a resumed trial runs its epochs from `step` again; TensorBoard drops the older ones.
            writer = SummaryWriter(str(run), purge_step=step)
            hp = flat_hparams(dict(trial.config or {}))
            self.hparams_seen.update(hp)
            _, ssi, _ = hparams(hp, {})
            writer.file_writer.add_summary(ssi)
            self.writers[trial_id] = writer
        return self.writers[trial_id]

    def write_experiment(self) -> None:
        """The HParams experiment (all hyperparameters and metric tags) in the run ``logdir`` itself, when it grew."""
        key = (frozenset(self.hparams_seen), frozenset(self.metric_tags))
        if key == self.experiment_written or not self.hparams_seen:
            return
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        metrics = {t: 0.0 for t in sorted(self.metric_tags)}
        exp, _, _ = hparams(self.hparams_seen, metrics)
        with SummaryWriter(self.logdir) as writer:
            writer.file_writer.add_summary(exp)
        self.experiment_written = key

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        writer = self.writer_for(trial, step)
        metrics = epoch_metrics(result)
        trial_id = str(trial.trial_id)
        value = metrics.get(self.metric)
        better = trial_id not in self.best or (value is not None and self.better_than(value, self.best[trial_id]))
        if value is not None and not math.isnan(value) and better:
            self.best[trial_id] = value
        if trial_id in self.best:
            metrics[f"{BEST_PREFIX}{self.metric}"] = self.best[trial_id]
        metrics["epoch"] = float(step)
        for tag, v in metrics.items():
            writer.add_scalar(tag, v, step)
        writer.flush()
        self.metric_tags.update(metrics)
        self.write_experiment()

    def end(self, trial: Any, status: str) -> None:
        writer = self.writers.pop(str(trial.trial_id), None)
        if writer is None:
            return
        writer.file_writer.add_summary(_session_end(status))
        writer.close()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, "STATUS_SUCCESS")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, "STATUS_FAILURE")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for writer in self.writers.values():
            writer.close()  # unfinished (interrupted) trials: no session end, they go on after a resume
        self.writers.clear()
        self.write_experiment()


def _previous_best(run: Path, tag: str, before_step: int) -> float | None:
    """The last ``tag`` value written before ``before_step`` in a trial's earlier event files (after a resume)."""
    if not run.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return None
    values = [e for e in acc.Scalars(tag) if e.step < before_step]
    return values[-1].value if values else None


def _session_end(status: str) -> Any:
    """The HParams session-end summary with ``status`` (``STATUS_SUCCESS``, ``STATUS_FAILURE``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=Status.Value(status)), version=metadata.PLUGIN_DATA_VERSION
    )
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    )
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=meta)])


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online with ``WANDB_API_KEY`` in the environment, offline without."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbCallback(Callback):
    """One W&B run per trial (name = trial id, group = the experiment), with its config and per-epoch metrics.

    Runs live in the driver (``reinit="create_new"``: several trials log at once); their files go to ``dir/wandb/``.
    No key is written: online mode uses ``WANDB_API_KEY`` (or an earlier ``wandb login``) as wandb finds it.
    Imports wandb only when a trial reports. After ``--resume`` a trial that goes on logs to a new run of the same
    name in the same group (offline runs cannot be resumed).

    Args:
        dir: the experiment folder (local).
        group: the W&B group: the experiment name.
        project: the W&B project.
    """

    def __init__(self, dir: str, group: str, project: str = "tune_agb"):
        self.dir = dir
        self.group = group
        self.project = project
        self.runs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "runs": {}}

    def run_for(self, trial: Any) -> Any:
        trial_id = str(trial.trial_id)
        if trial_id not in self.runs:
            import wandb

            Path(self.dir).mkdir(parents=True, exist_ok=True)
            self.runs[trial_id] = wandb.init(
                project=self.project,
                group=self.group,
                name=trial_id,
                job_type="trial",
                config=flat_hparams(dict(trial.config or {})),
                dir=self.dir,
                mode=wandb_mode(),
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True),
            )
        return self.runs[trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.run_for(trial).log({**epoch_metrics(result), "epoch": step}, step=step)

    def end(self, trial: Any, exit_code: int) -> None:
        run = self.runs.pop(str(trial.trial_id), None)
        if run is not None:
            run.finish(exit_code=exit_code)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, 0)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end(trial, 1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        import wandb

        for run in self.runs.values():
            run.finish()
        self.runs.clear()
        # finish() can return before W&B's service has written a run's last records (seen: the exit record missing
        # from the offline run file); teardown waits for the service to flush and stop.
        wandb.teardown()
