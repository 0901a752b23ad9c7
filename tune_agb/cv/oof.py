"""Out-of-fold prediction: every labelled train/val pixel predicted by the fold model that validated on it, each
fold model loaded by the engine's one checkpoint-to-model function
(:func:`tune_agb.engine.inference.model_from_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tune_agb.cv.assignment import FoldAssignment, fold_tiles
from tune_agb.engine.data import TileSet
from tune_agb.errors import TuneAgbError


@dataclass
class OutOfFold:
    """Every labelled train/val pixel predicted by the fold model that validated on it (never trained on it), in
    target units: per pixel ``tile`` (name), ``flat`` (row * W + col), ``fold``, label ``y``, ``mean`` and ``var``
    (float64 host arrays, folds in order). The honest sample to fit a variance calibration on when no split is left
    out of the final training."""

    tile: np.ndarray
    flat: np.ndarray
    fold: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def out_of_fold(
    states: list[dict[str, Any]],
    tiles: Mapping[str, TileSet],
    plan: FoldAssignment,
    device: str = "cpu",
    batch_size: int | None = None,
) -> OutOfFold:
    """Predict each fold's validation tiles with that fold's model.

    Args:
        states: the k fold checkpoints (e.g. :meth:`tune_agb.search.experiment.CVBest.fold_states`), in fold order;
            each is predicted with its own config and normalisation stats.
        tiles: the train and val splits (the store's, as the search saw them).
        plan: the fold assignment of the search.
        device: where to predict (``cpu``, ``cuda``, ``auto``).
        batch_size: tiles per batch (None: each model's training batch size).

    Returns:
        The labelled pixels of every fold's validation tiles with that fold's predictions, folds in order.

    Raises:
        TuneAgbError: when there are not ``plan.k`` states, or the tiles are not those ``plan`` was made for.
    """
    import torch

    from tune_agb.engine.data import SplitFeed
    from tune_agb.engine.device import resolve_amp, resolve_device
    from tune_agb.engine.inference import model_from_state
    from tune_agb.engine.train import evaluate_split

    if len(states) != plan.k:
        raise TuneAgbError(f"out_of_fold: {len(states)} fold models for a {plan.k}-fold assignment")
    dev = resolve_device(device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tile", "flat", "fold", "y", "mean", "var")}
    for j, state in enumerate(states):
        model, cfg, norm = model_from_state(state, dev, source=f"fold {j} checkpoint")
        val = fold_tiles(tiles, plan, j)["val"]
        feed = SplitFeed(val, norm, dev, cfg.data_mode)
        ev = evaluate_split(model, feed, cfg, norm, batch_size or cfg.batch_size, resolve_amp(cfg, dev), keep=())
        parts["tile"].append(np.asarray(val.names)[ev.tile])
        parts["flat"].append(ev.flat)
        parts["fold"].append(np.full(ev.tile.size, j))
        for key, t in (("y", ev.y), ("mean", ev.mean), ("var", ev.var)):
            parts[key].append(t.to(torch.float64).cpu().numpy())
    return OutOfFold(**{k: np.concatenate(v) for k, v in parts.items()})
