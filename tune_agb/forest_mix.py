"""The final model's forest part: the per-pixel texture forest mixed with the U-Net(s) at a fixed weight.

``final_train --forest W`` (or ``forest: W`` in a search space's ``final:`` section) fits the texture forest of
:mod:`tune_agb.baseline` (300 trees, 5 pixels per leaf at least, a third of the features per split, each band's local
standard deviation over 3, 7 and 15 px beside the bands) on the labelled train pixels, calibrates its variance on val
with the final model's calibration method (``--calibration``: with ``distance``, the shipped recipe's, the forest's
sigma widens where a pixel's bands lie far from the train pixels' as the U-Nets' does), and writes it to
``OUT/forest/`` beside the U-Net members. The run's metrics and predictions, ``predict`` and the map workers then
give at every pixel the two-component mixture with weight ``W`` on the forest::

    mean = (1 - W) m_u + W m_f
    var  = (1 - W) (s_u^2 + (m_u - mean)^2) + W (s_f^2 + (m_f - mean)^2)

where ``m_u, s_u`` are the U-Net part's mean and calibrated sigma (its ``calibration.json``) and ``m_f, s_f`` the
forest's (its own calibration, in ``forest.json``). The mixture is scored as a Gaussian of that mean and variance
(its intervals ``mean +- k sigma``), as an ensemble of members trained with different losses is, and the U-Net
part's sigma factor is fitted for Gaussian intervals too (a Laplacian U-Net's 68 % interval is +-0.81 sigma).
Why: the two models' errors differ enough that the half-and-half mixture scored below both of them over both shared
regions' 47 tiles (bench/RESULTS.md, issue 31).

Files of ``OUT/forest/`` (this module is their one reader and writer):

    forest.json     format, weight, texture windows, the forest's settings, its bands' normalisation, its calibration
    forest.pkl      the fitted scikit-learn forest (a pickle: load only runs you trust)

scikit-learn is needed to fit and to load one (``pip install 'tune_agb[baselines]'``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.baseline import LOSS, BaselineResult, RandomForest, fit_baseline
from tune_agb.engine.calibration import DEFAULT_METHOD, Calibration, calibration_from_dict
from tune_agb.engine.data import NormStats, TileSet
from tune_agb.errors import TuneAgbError
from tune_agb.runs import Prediction
from tune_agb.texture import Texture, parse_windows

FOREST_DIR = "forest"
ABOUT_FILE = "forest.json"
MODEL_FILE = "forest.pkl"
FORMAT = "tune_agb.forest/1"
# The texture forest of the baselines (bench/RESULTS.md, "Canopy texture"): its windows and settings.
WINDOWS = (3, 7, 15)
SETTINGS = {"trees": 300, "min_samples_leaf": 5, "max_features": 0.33}
# The mixture is read as Gaussian (the forest's distribution): its U-Net part is calibrated and scored as one too.
MIXTURE_LOSS = LOSS


def mixture(mu: Any, vu: Any, mf: Any, vf: Any, weight: float) -> tuple[Any, Any]:
    """Mean and variance of the mixture of (``mu``, ``vu``) and (``mf``, ``vf``) with weight ``weight`` on the second
    (numpy arrays or torch tensors of one shape)."""
    mean = (1 - weight) * mu + weight * mf
    return mean, (1 - weight) * (vu + (mu - mean) ** 2) + weight * (vf + (mf - mean) ** 2)


def check_weight(weight: Any, source: str, null: bool = False) -> float:
    """``weight`` as a float in (0, 1), or one error line naming ``source`` (``null``: the line says that null, no
    forest, is allowed too). The one check of the weight: options, a space's ``final.forest`` and ``forest.json``."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1:
        also = ", or null" if null else ""
        raise TuneAgbError(f"{source}: must be the forest's weight in the mixture, in (0, 1){also}, got {weight!r}")
    return float(weight)


@dataclass
class ForestPart:
    """A fitted texture forest, its bands' normalisation, its calibration and its weight in the mixture."""

    forest: RandomForest
    norm: NormStats
    calibration: Calibration
    weight: float
    windows: tuple[int, ...] = WINDOWS

    @property
    def margin(self) -> int:
        """Pixels at a window's edge whose texture features depend on the window (reflect padding)."""
        return max(self.windows) // 2

    def predict(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The forest's mean and calibrated variance (B, H, W), float64, for raw inputs ``x`` (B, C, H, W)."""
        if not isinstance(x, torch.Tensor):  # a read-only memory map is copied (torch wants writable arrays)
            x = torch.from_numpy(np.require(x, np.float32, ["W"]))
        x = x.float().cpu()
        feats = Texture(self.windows)(self.norm.normalize(x)).numpy()
        b, f, h, w = feats.shape
        mean, var = self.forest.predict(feats.transpose(0, 2, 3, 1).reshape(-1, f).astype(np.float64))
        # ``distance`` reads the raw bands (C, B, H, W), as the U-Net part's calibration does
        bands = np.moveaxis(x.numpy(), 1, 0) if self.calibration.needs_bands else None
        return mean.reshape(b, h, w), self.calibration.variance(var.reshape(b, h, w), bands)

    def mix(self, x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mixture's mean and sigma (float32, B, H, W) from the U-Net part's ``mean`` and calibrated ``std`` on
        raw inputs ``x`` (B, C, H, W)."""
        mf, vf = self.predict(x)
        m, v = mixture(mean.astype(np.float64), np.square(std.astype(np.float64)), mf, vf, self.weight)
        return m.astype(np.float32), np.sqrt(v).astype(np.float32)

    def mix_prediction(self, pr: Prediction, forest: Prediction, inputs: Any = None) -> Prediction:
        """The U-Net part's split prediction ``pr`` mixed with the forest's ``forest`` at the same labelled pixels;
        the whole-tile maps of ``pr`` (calibrated) are mixed with the forest run on those tiles of ``inputs`` (N, C,
        H, W). ``inputs`` None: the result keeps no maps (an uncalibrated prediction's, which nothing reads once it
        is calibrated)."""
        # both list a split's labelled pixels tile by tile, row-major (np.nonzero of its labels)
        if not (np.array_equal(pr.tile, forest.tile) and np.array_equal(pr.flat, forest.flat)):
            raise TuneAgbError("the forest's and the U-Net's labelled pixels differ (a bug: same tiles expected)")
        mean, var = mixture(pr.mean, pr.var, forest.mean, forest.var, self.weight)
        maps = {}
        for k, (m, v) in pr.maps.items() if inputs is not None else ():
            mf, vf = self.predict(np.asarray(inputs[k : k + 1]))
            mm, mv = mixture(m.astype(np.float64), v.astype(np.float64), mf[0], vf[0], self.weight)
            maps[k] = (mm.astype(m.dtype), mv.astype(v.dtype))
        return Prediction(pr.tile, pr.flat, pr.y, mean, var, maps)

    def about(self) -> dict[str, Any]:
        """What ``forest.json`` records (besides the format)."""
        return {
            "weight": self.weight,
            "texture_windows": list(self.windows),
            "forest": self.forest.params(),
            "norm": self.norm.to_dict(),
            "calibration": self.calibration.to_dict(),
        }


def fit_forest_part(
    tiles: dict[str, TileSet], norm: NormStats, weight: float, seed: int, calibration: str = DEFAULT_METHOD
) -> tuple[ForestPart, BaselineResult]:
    """The texture forest fitted on the labelled train pixels of ``tiles`` (bands normalised by ``norm``, the train
    split's), its variance calibrated on val by ``calibration`` (a method of :mod:`tune_agb.engine.calibration`: the
    final model's), with its predictions and metrics on the labelled val and test pixels: the baseline ``python -m
    tune_agb.baseline --model rf --texture-windows 3,7,15 --seed SEED --calibration METHOD``."""
    rf = RandomForest(SETTINGS["trees"], SETTINGS["min_samples_leaf"], SETTINGS["max_features"], seed=seed)
    res = fit_baseline(rf, tiles, norm, calibration, WINDOWS)
    return ForestPart(rf, norm, res.calibration, weight, WINDOWS), res


def save_forest_part(part: ForestPart, out: str | Path) -> Path:
    """Write ``OUT/forest/`` (:data:`ABOUT_FILE` last: a folder without it holds no forest part)."""
    folder = Path(out) / FOREST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(pickle.dumps(part.forest.forest, protocol=pickle.HIGHEST_PROTOCOL))
    tmp = folder / f".{ABOUT_FILE}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT} | part.about(), indent=1))
    tmp.replace(folder / ABOUT_FILE)
    return folder


def part_files(model: str | Path) -> list[Path]:
    """The files of ``model``'s forest part ([] when it has none)."""
    folder = Path(model) / FOREST_DIR
    return [folder / ABOUT_FILE, folder / MODEL_FILE] if (folder / ABOUT_FILE).is_file() else []


def load_forest_part(model: str | Path) -> ForestPart | None:
    """The forest part of a final run's folder ``model`` (None when it has none, or ``model`` is a checkpoint file).

    Raises:
        TuneAgbError: one line naming the file when ``forest.json`` or ``forest.pkl`` is unreadable, or
            scikit-learn is missing.
    """
    folder = Path(model) / FOREST_DIR
    about_path = folder / ABOUT_FILE
    if not about_path.is_file():
        return None
    try:
        about = json.loads(about_path.read_text())
        if not isinstance(about, dict) or about.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with format {FORMAT!r}")
        weight = check_weight(about["weight"], str(about_path))
        windows = parse_windows(",".join(map(str, about["texture_windows"])), source=str(about_path))
        norm = NormStats.from_dict(about["norm"])
        cal = calibration_from_dict(about["calibration"], str(about_path))
    except (ValueError, KeyError, TypeError) as exc:
        raise TuneAgbError(f"{about_path}: not a forest part ({exc})") from None
    try:
        from sklearn.ensemble import RandomForestRegressor
    except ImportError:
        raise TuneAgbError(
            f"{folder}: this model has a forest part; loading it needs scikit-learn (pip install 'tune_agb[baselines]')"
        ) from None
    try:
        forest = pickle.loads((folder / MODEL_FILE).read_bytes())
    except Exception as exc:  # unpickling a damaged file raises almost anything (KeyError, EOFError, ...)
        raise TuneAgbError(f"{folder / MODEL_FILE}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(forest, RandomForestRegressor):
        got = type(forest).__name__
        raise TuneAgbError(f"{folder / MODEL_FILE}: expected a fitted RandomForestRegressor, got {got}")
    return ForestPart(RandomForest.fitted(forest), norm, cal, weight, windows)
