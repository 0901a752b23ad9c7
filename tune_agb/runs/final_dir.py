"""The files of a final run's folder (``tune_agb.final_train`` and ``tune_agb.baseline`` out dirs): one reader and one
writer each.

    metrics.json          the val/test metrics (calibrated; ``uncalibrated``: before), the calibration, the run
    predictions.parquet   one row per labelled val/test pixel (:class:`Prediction` of each split)
    test_maps.npz         :class:`TileMaps`: whole maps of the most labelled test tiles
    ensemble.yaml         where an ensemble's members came from (seeds, search trials, or cv folds)
    calibration.json      the variance calibration (:class:`tune_agb.engine.calibration.Calibration`)

Readers raise one :class:`TuneAgbError` line naming the file and what was expected. ``config.yaml`` and the
checkpoints (``best.pt``, ``last.pt``, ``members/member_KK/``) are the engine's (:mod:`tune_agb.engine.config`,
:mod:`tune_agb.engine.checkpoint`).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from tune_agb.engine.calibration import IDENTITY, Calibration, calibration_from_dict, pixel_bands
from tune_agb.errors import TuneAgbError
from tune_agb.location import join, read_bytes, read_document, read_table, write_atomic

if TYPE_CHECKING:  # torch: imported by the engine's data module
    from tune_agb.engine.data import TileSet

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
TEST_MAPS_FILE = "test_maps.npz"
ENSEMBLE_FILE = "ensemble.yaml"
ENSEMBLE_FORMAT = "tune_agb.ensemble/1"
ENSEMBLE_KINDS = ("seeds", "configs", "folds")
CALIBRATION_FILE = "calibration.json"
PREDICTION_COLUMNS = ("split", "tile", "row", "col", "label", "mean", "std", "std_uncalibrated")
MAP_ARRAYS = ("names", "mean", "std", "label")

Folder = str | Path


# -- metrics.json -----------------------------------------------------------------------------------------------
def write_metrics(folder: Folder, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` (a JSON object; atomically)."""
    write_atomic(join(str(folder), METRICS_FILE), json.dumps(metrics, indent=1).encode())


def read_metrics(folder: Folder) -> dict[str, Any]:
    """``metrics.json`` of a run folder.

    Raises:
        TuneAgbError: when it is missing, not valid JSON or not a JSON object.
    """
    where = join(str(folder), METRICS_FILE)
    doc = read_document(where, "json")
    if doc is None:
        raise TuneAgbError(f"{where}: not found (expected a final_train or baseline out dir)")
    if not isinstance(doc, dict):
        raise TuneAgbError(f"{where}: expected a JSON object of metrics, got {type(doc).__name__}")
    return doc


# -- predictions.parquet ----------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A split's prediction on the host: at its labelled pixels (``tile`` index, ``flat`` = row * W + col) label
    ``y``, ``mean`` and ``var`` (target units; flat arrays of one length), and the whole (mean, var) maps (H, W) of a
    few tiles (by tile index)."""

    tile: np.ndarray
    flat: np.ndarray
    y: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    maps: dict[int, tuple[np.ndarray, np.ndarray]]

    def calibrated(self, cal: Calibration, inputs: Any = None) -> Prediction:
        """The same prediction with every variance (pixels and maps) mapped by ``cal``; ``inputs``: the split's input
        tiles (N, C, H, W), needed when ``cal.needs_bands``."""
        if not cal.needs_bands:
            maps = {k: (m, cal.variance(v)) for k, (m, v) in self.maps.items()}
            return replace(self, var=cal.variance(self.var), maps=maps)
        if inputs is None:
            raise TuneAgbError(f"calibration {cal.method!r}: needs the input tiles of the pixels it calibrates")
        maps = {k: (m, cal.variance(v, np.asarray(inputs[k]))) for k, (m, v) in self.maps.items()}
        return replace(self, var=cal.variance(self.var, self.bands(inputs)), maps=maps)

    def bands(self, inputs: Any) -> np.ndarray:
        """The input bands (C, pixels) of the labelled pixels, from the split's input tiles (N, C, H, W)."""
        return pixel_bands(inputs, self.tile, self.flat)

    def metrics(self, loss: str) -> dict[str, float]:
        """:func:`tune_agb.engine.metrics.labelled_metrics` of the labelled pixels (target units)."""
        import torch

        from tune_agb.engine.metrics import labelled_metrics

        return labelled_metrics(*(torch.from_numpy(a) for a in (self.y, self.mean, self.var)), loss)


def write_predictions(
    folder: Folder, tiles: dict[str, TileSet], preds: dict[str, Prediction], uncalibrated: dict[str, Prediction]
) -> None:
    """Write ``predictions.parquet``: one row per labelled pixel of each split of ``preds``: ``split``, ``tile``
    (name), ``row``, ``col``, ``label``, ``mean``, ``std`` (calibrated) and ``std_uncalibrated``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[np.ndarray]] = {k: [] for k in PREDICTION_COLUMNS}
    for split, pr in preds.items():
        w = tiles[split].labels.shape[-1]
        cols["split"].append(np.full(pr.tile.size, split))
        cols["tile"].append(np.asarray(tiles[split].names)[pr.tile])
        cols["row"].append((pr.flat // w).astype(np.int32))
        cols["col"].append((pr.flat % w).astype(np.int32))
        cols["label"].append(pr.y)
        cols["mean"].append(pr.mean)
        cols["std"].append(np.sqrt(pr.var))
        cols["std_uncalibrated"].append(np.sqrt(uncalibrated[split].var))
    buf = io.BytesIO()
    pq.write_table(pa.table({k: np.concatenate(v) for k, v in cols.items()}), buf)
    write_atomic(join(str(folder), PREDICTIONS_FILE), buf.getvalue())


def read_predictions(folder: Folder) -> pd.DataFrame:
    """``predictions.parquet`` as a DataFrame (at least ``split``, ``label``, ``mean``, ``std``).

    Raises:
        TuneAgbError: when it is missing, not parquet, or lacks one of those columns.
    """
    where = join(str(folder), PREDICTIONS_FILE)
    table = read_table(where)
    if table is None:
        raise TuneAgbError(f"{where}: not found (expected a final_train or baseline out dir)")
    df = table.to_pandas()
    missing = {"split", "label", "mean", "std"} - set(df.columns)
    if missing:
        raise TuneAgbError(f"{where}: missing columns {', '.join(sorted(missing))}")
    return df


# -- test_maps.npz ----------------------------------------------------------------------------------------------
@dataclass
class TileMaps:
    """Whole maps of a few test tiles: ``names`` (K,), ``mean``, ``std``, ``label`` (K, H, W) float32 in label
    units; ``label`` is NaN except at the labelled pixels (GEDI footprints)."""

    names: list[str]
    mean: np.ndarray
    std: np.ndarray
    label: np.ndarray

    @classmethod
    def of(cls, tiles: TileSet, pred: Prediction) -> TileMaps:
        """The maps ``pred`` kept of ``tiles`` (in the order kept), with their labels."""
        order = list(pred.maps)
        return cls(
            [tiles.names[i] for i in order],
            np.stack([pred.maps[i][0] for i in order]).astype(np.float32),
            np.sqrt(np.stack([pred.maps[i][1] for i in order])).astype(np.float32),
            np.stack([np.asarray(tiles.labels[i], dtype=np.float32) for i in order]),
        )


def write_test_maps(folder: Folder, maps: TileMaps) -> None:
    """Write ``test_maps.npz`` (arrays ``names``, ``mean``, ``std``, ``label``)."""
    buf = io.BytesIO()
    np.savez(buf, names=np.asarray(maps.names), mean=maps.mean, std=maps.std, label=maps.label)
    write_atomic(join(str(folder), TEST_MAPS_FILE), buf.getvalue())


def read_test_maps(folder: Folder) -> TileMaps | None:
    """The maps of ``test_maps.npz``; None when there is no such file (out dirs of versions before it).

    Raises:
        TuneAgbError: when the file is not an ``.npz`` of these four arrays with matching shapes.
    """
    file = join(str(folder), TEST_MAPS_FILE)
    data = read_bytes(file)
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [k for k in MAP_ARRAYS if k not in z.files]
            arrays = {} if missing else {k: z[k] for k in MAP_ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise TuneAgbError(f"{file}: not a readable .npz of names, mean, std, label ({exc})") from None
    if missing:
        raise TuneAgbError(f"{file}: missing array {', '.join(missing)} (expected {', '.join(MAP_ARRAYS)})")
    names, mean = arrays["names"], arrays["mean"]
    if mean.ndim != 3 or mean.shape[0] == 0 or not np.issubdtype(mean.dtype, np.floating):
        raise TuneAgbError(f"{file}: 'mean' must be a float array (K, H, W) with K >= 1, got {mean.dtype} {mean.shape}")
    for key in ("std", "label"):
        a = arrays[key]
        if a.shape != mean.shape or not np.issubdtype(a.dtype, np.floating):
            raise TuneAgbError(f"{file}: '{key}' must be float {mean.shape} like 'mean', got {a.dtype} {a.shape}")
    if names.shape != mean.shape[:1] or names.dtype.kind != "U":
        raise TuneAgbError(f"{file}: 'names' must be {mean.shape[0]} strings, got {names.dtype} {names.shape}")
    return TileMaps([str(n) for n in names], mean, arrays["std"], arrays["label"])


# -- ensemble.yaml ----------------------------------------------------------------------------------------------
def write_ensemble(folder: Folder, kind: str, members: list[dict[str, Any]], **about: Any) -> None:
    """Write ``ensemble.yaml``: ``format``, ``kind`` (``seeds``, ``configs`` or ``folds``), what ``about`` holds
    (e.g. ``experiment``, ``metric``, ``mode``, ``trial_id``, ``epoch``, ``k``) and ``members``: one mapping per
    member with its ``folder`` (``members/member_KK``) and where it came from (``seed``, ``trial_id``, ``fold``...)."""
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"ensemble kind {kind!r} is not one of {ENSEMBLE_KINDS}")
    doc = {"format": ENSEMBLE_FORMAT, "kind": kind, **about, "members": members}
    write_atomic(join(str(folder), ENSEMBLE_FILE), yaml.safe_dump(doc, sort_keys=False).encode())


def read_ensemble(folder: Folder) -> dict[str, Any] | None:
    """``ensemble.yaml`` of a run folder as a mapping (see :func:`write_ensemble`); None for a single-model run.

    Raises:
        TuneAgbError: when it is not YAML, or its ``format``, ``kind`` or ``members`` are not as written.
    """
    where = join(str(folder), ENSEMBLE_FILE)
    doc = read_document(where, "yaml")
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT:
        raise TuneAgbError(f"{where}: expected a mapping with format: {ENSEMBLE_FORMAT}")
    if doc.get("kind") not in ENSEMBLE_KINDS:
        raise TuneAgbError(f"{where}: 'kind' must be one of {', '.join(ENSEMBLE_KINDS)}, got {doc.get('kind')!r}")
    members = doc.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) and "folder" in m for m in members):
        raise TuneAgbError(f"{where}: 'members' must be a list of mappings, each with a 'folder'")
    return doc


# -- calibration.json -------------------------------------------------------------------------------------------
def save_calibration(cal: Calibration, path: str | Path) -> None:
    """Write ``cal`` as JSON to ``path`` (a run's ``calibration.json``, or any file; atomically)."""
    write_atomic(str(path), (json.dumps(cal.to_dict(), indent=1) + "\n").encode())


def load_calibration(path: str | Path) -> Calibration:
    """Read and check a calibration JSON file; any problem is one :class:`TuneAgbError` naming the file and field."""
    try:
        data = read_bytes(str(path))
    except TuneAgbError as exc:
        raise TuneAgbError(f"{path}: not a readable calibration JSON file ({str(exc).split(': ', 1)[-1]})") from None
    if data is None:
        raise TuneAgbError(f"{path}: calibration file not found")
    try:
        d = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuneAgbError(f"{path}: not a readable calibration JSON file ({exc})") from None
    return calibration_from_dict(d, str(path))


def model_calibration(model: str | Path) -> tuple[Calibration, Path | None]:
    """The calibration saved with a model: ``calibration.json`` in a final-train out dir (single model or ensemble),
    or beside a ``best.pt`` given as a file (the checkpoint it was fitted for). Identity, and None, for a model
    without one (saved before calibration existed, a member of an ensemble, or another epoch's checkpoint)."""
    model = Path(model)
    folder = model if model.is_dir() else model.parent if model.name == "best.pt" else None
    if folder is None or not (folder / CALIBRATION_FILE).is_file():
        return IDENTITY, None
    return load_calibration(folder / CALIBRATION_FILE), folder / CALIBRATION_FILE
