"""The k models of a cross-validation, trained in step in one process.

Each reported epoch, every fold's model trains one epoch (:meth:`tune_agb.engine.train.Run.one_epoch`, exactly as
:func:`~tune_agb.engine.train.train` would train it alone) and is validated on its fold; ``on_epoch`` gets the mean
and the spread over folds (:func:`fold_summary`) and a checkpoint holding the k runs (:func:`folds_state`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tune_agb.engine.checkpoint import CHECKPOINT_FORMAT
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import NormStats, TileSet
from tune_agb.engine.device import resolve_device
from tune_agb.engine.metric_names import FOLD_SPREAD
from tune_agb.engine.train import EpochReport, Run, StopTraining, TrainResult, check_run
from tune_agb.errors import DivergenceError, TuneAgbError

# How per-fold values combine: summed (pixel counts), the largest (memory peaks), else the mean over folds.
_FOLD_SUM = ("val_n",)
_FOLD_MAX = ("gpu_mem_peak_gb",)


def fold_summary(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """One epoch's metrics over the folds: each the mean over folds (``val_n`` summed, ``gpu_mem_peak_gb`` the largest),
    ``epoch`` as it is, plus the spread and the per-fold values of :data:`FOLD_SPREAD` (:func:`fold_metric_names`).

    A non-finite value in any fold makes the mean (and spread) non-finite: a fold that diverged is not averaged away.
    """
    out: dict[str, float] = {"epoch": per_fold[0]["epoch"]}
    for key, first in per_fold[0].items():
        if key == "epoch" or isinstance(first, bool) or not isinstance(first, (int, float)):
            continue
        values = np.array([float(m[key]) for m in per_fold], dtype=np.float64)
        if key in _FOLD_SUM:
            out[key] = float(values.sum())
        elif key in _FOLD_MAX:
            out[key] = float(values.max())
        else:
            out[key] = float(values.mean())
    for key in FOLD_SPREAD:
        values = np.array([float(m[key]) for m in per_fold], dtype=np.float64)
        finite = bool(np.isfinite(values).all())
        out[f"{key}_sd"] = float(values.std(ddof=1)) if finite and len(values) > 1 else math.inf
        for j, v in enumerate(values):
            out[f"{key}_fold{j}"] = float(v)
    return out


@dataclass
class FoldsReport:
    """What ``on_epoch`` of :func:`train_folds` receives after each epoch: ``metrics`` (:func:`fold_summary` of the
    folds' metrics), each fold's :class:`EpochReport`, the checkpoint of all the folds (``state``) and whether the
    mean validation RMSE is the best so far."""

    epoch: int
    metrics: dict[str, float]
    folds: list[EpochReport]
    state: Callable[[], dict[str, Any]]
    is_best: bool


def train_folds(
    cfg: TrainConfig,
    folds: list[dict[str, TileSet]],
    *,
    norms: list[NormStats | None] | None = None,
    device: str = "auto",
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[FoldsReport], None] | None = None,
    progress: bool = True,
    device_share: float = 1.0,
) -> list[TrainResult]:
    """Train the k models of a cross-validation in one process, in step, one epoch of each per reported epoch.

    Fold ``j``'s model trains on ``folds[j]['train']`` and is validated on ``folds[j]['val']``, exactly as
    :func:`train` would train it alone (same seed, batches, schedule): the cost is k times one fold's. After every
    epoch ``on_epoch`` gets the mean and the spread over folds (:func:`fold_summary`) and a ``state`` holding the k
    checkpoints.

    Args:
        cfg: hyperparameters (every fold's).
        folds: per fold, ``train`` and ``val`` TileSets.
        norms: per fold, the normalisation stats of its training tiles (None: computed from them).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: a checkpoint of :func:`train_folds` (``folds``: one engine checkpoint per fold); training goes on
            after its epoch.
        on_epoch: called after every epoch with a :class:`FoldsReport`; may raise :class:`StopTraining`.
        progress: show a tqdm bar over epochs.
        device_share: the share of the GPU the k runs may use together (each fold's run gets ``device_share / k``).

    Returns:
        Each fold's :class:`TrainResult`.

    Raises:
        DivergenceError: when a fold's training loss or validation metrics are not finite (its message names the
            fold; its metrics report ``val_rmse`` = inf).
    """
    k = len(folds)
    if k < 2:
        raise TuneAgbError(f"train_folds: needs at least 2 folds, got {k}")
    saved = [None] * k if resume is None else list(resume["folds"])
    if len(saved) != k:
        raise TuneAgbError(f"resume: the checkpoint holds {len(saved)} folds but {k} are asked for")
    dev = resolve_device(device)
    norms = [None] * k if norms is None else norms
    checked = [check_run(cfg, tiles, norm, st) for tiles, norm, st in zip(folds, norms, saved, strict=True)]
    runs, rngs = [], []
    for tiles, norm, st in zip(folds, checked, saved, strict=True):
        runs.append(Run(cfg, tiles, norm, dev, st, device_share / k))
        rngs.append(_RngState.take(dev))  # each fold draws from its own stream, as when trained alone
    done = {run.epochs_done for run in runs}
    if len(done) != 1:
        raise TuneAgbError(f"resume: the folds' checkpoints are at different epochs ({sorted(done)})")
    history = [dict(h) for h in resume["history"]] if resume is not None else []
    best = dict(resume["best"]) if resume is not None else {"epoch": 0, "val_rmse": math.inf}
    start = done.pop()
    bar = tqdm(range(start, cfg.epochs), initial=start, total=cfg.epochs, disable=not progress, desc=f"train {k} folds",
               unit="epoch", leave=False)  # fmt: skip
    for _ in bar:
        reports = []
        for j, run in enumerate(runs):
            rngs[j].put()
            try:
                report = run.one_epoch()
            except DivergenceError as exc:
                raise DivergenceError(f"fold {j}: {exc}", {**exc.metrics, "val_rmse": math.inf}) from None
            rngs[j] = _RngState.take(dev)
            reports.append(dataclasses.replace(report, state=rngs[j].stamped(report.state)))
        metrics = fold_summary([r.metrics for r in reports])
        history.append(metrics)
        epoch = int(metrics["epoch"])
        is_best = metrics["val_rmse"] < best["val_rmse"]
        if is_best:
            best = {"epoch": epoch, "val_rmse": metrics["val_rmse"]}

        state = _folds_state_at(cfg, reports, list(history), dict(best))
        bar.set_postfix(val_rmse=f"{metrics['val_rmse']:.3g}", sd=f"{metrics['val_rmse_sd']:.2g}")
        if on_epoch is not None:
            try:
                on_epoch(FoldsReport(epoch, metrics, reports, state, is_best))
            except StopTraining as stop:
                for run in runs:
                    run.result.stopped = str(stop) or "stopped by callback"
                break
    bar.close()
    return [run.result for run in runs]


@dataclass(frozen=True)
class _RngState:
    """The global torch RNG streams (CPU, and CUDA on a CUDA device) of one fold's run, kept apart from the other
    folds' between epochs: dropout then draws what it would draw in a run of that fold alone, and a resumed fold goes
    on with its own stream."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def take(cls, dev: torch.device) -> _RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if dev.type == "cuda" else [])

    def put(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)

    def stamped(self, state: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        """``state`` with these streams as the checkpoint's RNG states (the global ones belong to the last fold)."""

        def with_streams() -> dict[str, Any]:
            st = state()
            return {**st, "rng": {**st["rng"], "torch": self.cpu.clone(), "cuda": [c.clone() for c in self.cuda]}}

        return with_streams


def _folds_state_at(
    cfg: TrainConfig, reports: list[EpochReport], history: list[dict[str, float]], best: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """The checkpoint of this epoch, built only when asked for (the folds' states copy every weight)."""
    return lambda: folds_state(cfg, [r.state() for r in reports], history, best)


def folds_state(
    cfg: TrainConfig, states: list[dict[str, Any]], history: list[dict[str, float]], best: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint of a cross-validation: ``format``, ``epoch`` (the folds' common epoch), ``config``, ``folds`` (one
    engine checkpoint per fold, each loadable on its own, e.g. as an ensemble member), ``history``
    (:func:`fold_summary` per epoch) and ``best`` (``epoch``, ``val_rmse``: the lowest mean validation RMSE)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(states[0]["epoch"]),
        "config": cfg.to_dict(),
        "folds": states,
        "history": [dict(h) for h in history],
        "best": dict(best),
    }
