"""The checkpoint format: one dict of tensors and plain Python values, loadable with ``weights_only=True``.

Keys: ``format``, ``epoch`` (epochs completed), ``config`` (TrainConfig as a dict), ``norm`` (NormStats as a
dict), ``model``, ``optimizer``, ``scheduler``, ``scaler`` (state dicts), ``rng`` (``torch``, ``cuda``,
``shuffle`` generator states), ``history`` (per-epoch metric dicts), ``best`` (``epoch``, ``val_rmse``).
A cross-validation's checkpoint holds ``folds`` (one such dict per fold) instead of the model's keys.

Checkpoints written before tune_agb 0.2 may name options removed since (:data:`~tune_agb.engine.config.REMOVED_KEYS`):
at their neutral value they load as today's; otherwise (a weight average, texture inputs, ...) and pretrained trunks
(``python -m tune_agb.pretrain``, removed) the loader refuses them with one line naming the key.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from tune_agb.engine.config import drop_removed_keys
from tune_agb.errors import TuneAgbError

CHECKPOINT_FORMAT = "tune_agb.checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically (temporary file + rename): an interrupted save never leaves a broken checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a tune_agb checkpoint safely (``weights_only=True``: no arbitrary code from a file someone hands you)."""
    path = Path(path)
    if not path.is_file():
        raise TuneAgbError(f"{path}: checkpoint file not found")
    return _load(path, str(path), map_location)


def load_checkpoint_bytes(data: bytes, source: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`load_checkpoint` for a checkpoint read into memory (from any storage); ``source`` names it in errors."""
    return _load(io.BytesIO(data), source, map_location)


def _load(file: Any, source: str, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise TuneAgbError(f"{source}: not a loadable tune_agb checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TuneAgbError(f"{source}: not a tune_agb checkpoint (expected format {CHECKPOINT_FORMAT})")
    return _without_removed_keys(state, source)


def _without_removed_keys(state: dict[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint of an older tune_agb as today's engine writes it, or one TuneAgbError naming the removed key."""
    if "pretrain" in state:
        raise TuneAgbError(
            f"{source}: 'pretrain': a trunk of tune_agb.pretrain, which was removed in tune_agb 0.2 (measured no "
            "gain, see bench/RESULTS.md), cannot be loaded"
        )
    state = dict(state)
    if isinstance(state.get("config"), dict):
        state["config"] = drop_removed_keys(state["config"], source, "checkpoint")
    if isinstance(state.get("folds"), list):
        state["folds"] = [_without_removed_keys(f, f"{source} fold {j}") if isinstance(f, dict) else f
                          for j, f in enumerate(state["folds"])]  # fmt: skip
    return state
