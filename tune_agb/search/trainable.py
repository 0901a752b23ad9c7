"""The Ray Tune function trainable: a thin adapter between Tune and :func:`tune_agb.engine.train.train`.

Tune gives it the sampled hyperparameters; only the data's location travels (a :class:`~tune_agb.store.DataSource`),
and the trial opens the node's packed store (memory maps shared through the page cache), packing it first on a node
that has none. Each epoch it reports the engine's metrics with a checkpoint directory holding
``checkpoint.pt`` (the engine's full state) and the report log (the layout is :mod:`tune_agb.search.experiment`'s),
and it resumes from the newest stored checkpoint when Tune restores it.

With a fold assignment (the space's ``cv`` section) the trial trains the k fold models in step
(:func:`tune_agb.engine.folds_loop.train_folds`) and reports, each epoch, the mean over folds under the usual names
(what ASHA and Optuna act on), the spread (``val_rmse_sd``, ``val_r2_sd``) and every fold's value; its checkpoint holds
the k fold states.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from typing import Any

import ray
import torch
from ray import tune

from tune_agb.cv import FoldAssignment, fold_tiles
from tune_agb.engine.config import config_from_dict
from tune_agb.engine.folds_loop import FoldsReport, train_folds
from tune_agb.engine.train import EpochReport, train
from tune_agb.errors import DivergenceError, InfeasibleError
from tune_agb.search import experiment
from tune_agb.search.experiment import write_checkpoint_folder
from tune_agb.search.space import METRICS, cv_metrics
from tune_agb.store import DataSource


def finite_or_inf(metrics: dict[str, Any]) -> dict[str, Any]:
    """Replace NaN/inf floats by ``inf``: Optuna refuses NaN (the trial would stay RUNNING) but accepts inf."""
    return {k: (math.inf if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def select_device(gpu_ids: list[Any], gpu_fraction: float, cuda_available: bool) -> tuple[str, float | None]:
    """Pick the trial's device and the share of GPU memory it may use.

    Args:
        gpu_ids: ``ray.get_gpu_ids()`` of the trial (Ray has set ``CUDA_VISIBLE_DEVICES`` to them).
        gpu_fraction: the trial's ``gpu`` resource (0.25 = a quarter of one card).
        cuda_available: ``torch.cuda.is_available()``.

    Returns:
        ``("cuda:0", fraction)`` on a GPU (index 0 of the visible ones), ``("cpu", None)`` otherwise. Ray does not
        isolate GPU memory between trials sharing a card, so the fraction is applied with
        ``torch.cuda.set_per_process_memory_fraction``; None means no cap (a whole card or more).
    """
    if not gpu_ids or gpu_fraction <= 0 or not cuda_available:
        return "cpu", None
    return "cuda:0", (gpu_fraction if gpu_fraction < 1 else None)


def _trial_folders(experiment_uri: str | None, checkpoint: Any) -> list[experiment.Folder]:
    """Where the trial's checkpoints are stored: its folder in the experiment storage, then Ray's checkpoint's."""
    folders = []
    if experiment_uri is not None:
        trial_name = os.path.basename(tune.get_context().get_trial_dir().rstrip("/"))
        folders.append(experiment.trial_folder(experiment_uri, trial_name))
    if checkpoint is not None:
        folders.append((checkpoint.filesystem, os.path.dirname(checkpoint.path.rstrip("/"))))
    return folders


def restore_point(checkpoint: Any, experiment_uri: str | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Where a (re)started trial goes on from: the engine state and the report log of its newest stored checkpoint.

    Prefers :func:`~tune_agb.search.experiment.newest_stored_checkpoint` of the trial's folder over the (possibly
    older) checkpoint Ray hands back; falls back to Ray's checkpoint, then to a fresh start ``(None, [])``.
    """
    return experiment.restore_point(_trial_folders(experiment_uri, checkpoint))


def search_trial(
    config: dict[str, Any],
    *,
    data: DataSource,
    base: dict[str, Any],
    cpus: float = 1,
    gpu_fraction: float = 0,
    experiment_uri: str | None = None,
    folds: FoldAssignment | None = None,
) -> None:
    """Train one trial's configuration, reporting to Tune after every epoch.

    Args:
        config: the hyperparameters Optuna sampled for this trial.
        data: where the ``train`` and ``val`` tiles are; opened (packed on first use on this node) by the trial.
        base: defaults + fixed hyperparameters, with ``epochs`` = the trial's full budget.
        cpus: CPUs reserved for the trial (torch threads).
        gpu_fraction: GPUs reserved for the trial (0.25 = a quarter of one card).
        experiment_uri: ``STORAGE/NAME`` of the search; the trial looks there for checkpoints newer than the one
            Ray hands back after an interruption (None: only Ray's checkpoint's own folder is looked at).
        folds: the cross-validation's fold assignment (None: train on ``train``, validate on ``val``).
    """
    cfg = config_from_dict({**base, **config}, source="trial config")
    # The store's memory maps are read-only; the engine only reads them (it normalises into new tensors).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(max(1, int(cpus)))
    device, mem_fraction = select_device(ray.get_gpu_ids(), gpu_fraction, torch.cuda.is_available())
    if mem_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(mem_fraction, 0)
    node_id = ray.get_runtime_context().get_node_id()

    trial_id = tune.get_context().get_trial_id()
    resume, log_rows = restore_point(tune.get_checkpoint(), experiment_uri)
    if resume is not None and int(resume["epoch"]) >= cfg.epochs and log_rows:
        # Finished before an interruption, though Ray's saved state may say otherwise: report the stored final row
        # (same wall_time, so result readers see one row) so Tune, Optuna and ASHA get the final value, and stop.
        tune.report({k: v for k, v in log_rows[-1].items() if k not in ("trial_id", "config")})
        return

    def on_epoch(report: EpochReport | FoldsReport) -> None:
        metrics = finite_or_inf(report.metrics) | {"node_id": node_id, "pid": os.getpid(), "wall_time": time.time()}
        log_rows.append({**metrics, "trial_id": trial_id, "config": dict(config)})
        with tempfile.TemporaryDirectory(prefix="tune_agb_ckpt_") as tmp:
            write_checkpoint_folder(tmp, report.state(), log_rows)
            # Tune copies the directory to the experiment storage inside report(), so a temporary one is fine.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    packed = data.open()
    share = gpu_fraction if device != "cpu" else 1.0
    try:
        if folds is None:
            train(cfg, packed.tiles, norm=packed.norm(cfg.standardize_target), device=device, resume=resume,
                  on_epoch=on_epoch, progress=False, device_share=share)  # fmt: skip
        else:
            train_folds(
                cfg,
                [fold_tiles(packed.tiles, folds, j) for j in range(folds.k)],
                norms=[folds.train_norm(j, cfg.standardize_target) for j in range(folds.k)],
                device=device,
                resume=resume,
                on_epoch=on_epoch,
                progress=False,
                device_share=share,
            )
    except DivergenceError as exc:
        # Tell the searcher and scheduler (inf, never NaN), then fail so Tune retries from the last checkpoint.
        tune.report(finite_or_inf(exc.metrics) | {"node_id": node_id, "pid": os.getpid(), "wall_time": time.time()})
        raise
    except (InfeasibleError, torch.OutOfMemoryError) as exc:
        # Does not fit its GPU share: a retry would fail the same way. Report inf with the reason and end the trial
        # (its memory is freed with its process; neighbours on the card never see an out-of-memory error).
        if isinstance(exc, InfeasibleError):
            reason = exc.reason
        else:
            reason = f"infeasible: out of memory while training ({str(exc).splitlines()[0]})"
        where = {"node_id": node_id, "pid": os.getpid(), "wall_time": time.time()}
        tune.report(infeasible_result(reason, len(log_rows), folds.k if folds else 0) | where)


def infeasible_result(reason: str, epochs_done: int = 0, k: int = 0) -> dict[str, Any]:
    """The one result an infeasible trial reports: every metric ``inf`` (with ``k`` folds, the fold figures too),
    the epoch after its last reported one, and ``infeasible``: the reason (shown in results.parquet and the
    summary)."""
    names = (*METRICS, *(cv_metrics(k) if k else ()))
    return {m: math.inf for m in names} | {"epoch": epochs_done + 1, "infeasible": reason}
