"""Per-pixel baselines on the input bands, the no-spatial-context models a U-Net has to beat: ridge regression and a
random forest.

    python -m tune_agb.baseline [--input-dir D --label-dir D] [--model ridge rf] [--alpha 1.0]
        [--trees 300] [--min-samples-leaf 5] [--max-features 0.33] [--seed 0] [--jobs 1]
        [--texture-windows 3,7,15] [--calibration scale|isotonic|distance|none] [--out-dir DIR] [--overwrite]

Each model is fitted on the labelled train pixels (bands normalised with the train split's stats, NaN -> band mean)
and scored on the labelled pixels of val and test with the U-Net's metrics. With ``--texture-windows`` each pixel
also gets each band's local standard deviation over those windows (:mod:`tune_agb.texture`): the strongest
baseline without a network. Their predicted variance is recalibrated
on val as final_train's is (same methods, same default), so the coverages compare. The uncertainty of each:

- ridge: one variance for every pixel, the mean squared residual of the train pixels;
- random forest (scikit-learn, ``pip install 'tune_agb[baselines]'``): the forest read as an equal mixture of its
  trees, each tree predicting the mean and variance of the train labels in the pixel's leaf (in-bag, bootstrap
  weights): variance = mean over trees of the leaf variances + variance over trees of the leaf means. The same
  formula as the U-Net ensembles' total variance; the tree spread alone (the second term) leaves out the label
  noise within a leaf and is far too narrow.

Memory: the tiles are read through the packed store's memory map a few tiles at a time; only the labelled pixels'
features (P x bands, float64) are held.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.demo_data import data_dirs
from tune_agb.engine.calibration import DEFAULT_METHOD, METHODS, Calibration, fit_calibration, labelled_bands
from tune_agb.engine.data import NormStats, TileSet, compute_norm_stats
from tune_agb.engine.metrics import regression_metrics
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.runs import CALIBRATION_FILE, METRICS_FILE, Prediction, save_calibration, write_metrics, write_predictions
from tune_agb.texture import Texture, parse_windows

MODELS = ("ridge", "rf")
LOSS = "gaussian_nll"  # how the baselines' predictive distributions are scored (NLL) and calibrated
# Tiles normalised at once while the labelled pixels are gathered (memory: CHUNK x bands x H x W float32).
CHUNK = 16
# Pixels a forest predicts at once (memory: trees x PREDICT_CHUNK x 16 bytes, 79 MB for 300 trees).
PREDICT_CHUNK = 16384


@dataclass
class Pixels:
    """The labelled pixels of a split: normalised band values ``x`` (P, bands) float64, labels ``y`` (P,), and where
    they are: ``tile`` (index in the split), ``flat`` (row * W + col)."""

    x: np.ndarray
    y: np.ndarray
    tile: np.ndarray
    flat: np.ndarray


def labelled_pixels(tiles: TileSet, norm: NormStats, chunk: int = CHUNK, windows: tuple[int, ...] = ()) -> Pixels:
    """The labelled pixels of ``tiles``, read ``chunk`` tiles at a time (a memory-mapped split stays on disk);
    ``windows``: add each band's local standard deviation over these windows (:class:`~tune_agb.texture.Texture`)
    as features, after the bands."""
    texture = Texture(windows)
    xs, ys, ts, fs = [], [], [], []
    w = tiles.labels.shape[-1]
    for i in range(0, len(tiles), chunk):
        lab = np.asarray(tiles.labels[i : i + chunk], dtype=np.float32)
        mask = np.isfinite(lab)
        if not mask.any():
            continue
        x = norm.normalize(torch.from_numpy(np.asarray(tiles.inputs[i : i + chunk], dtype=np.float32)))
        x = texture(x).numpy()
        t, r, c = np.nonzero(mask)
        xs.append(x.transpose(0, 2, 3, 1)[mask].astype(np.float64))
        ys.append(lab[mask].astype(np.float64))
        ts.append(t + i)
        fs.append(r * w + c)
    if not xs:
        raise TuneAgbError(f"split '{tiles.split}': no labelled pixel")
    return Pixels(np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), np.concatenate(fs))


def pixel_features(tiles: TileSet, norm: NormStats) -> tuple[np.ndarray, np.ndarray]:
    """(labelled pixels, bands) normalised features and their labels."""
    px = labelled_pixels(tiles, norm)
    return px.x, px.y


# -- the models: fit on the train pixels, then (mean, variance) per pixel -------------------------------------
def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Weights (bands + 1) of ridge regression with an unpenalised intercept (last weight)."""
    a = np.c_[x, np.ones(len(x))]
    reg = alpha * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(a.T @ a + reg, a.T @ y)


class Ridge:
    """Ridge regression; its variance is the train pixels' mean squared residual, the same for every pixel."""

    name = "ridge"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ridge:
        self.w = fit_ridge(x, y, self.alpha)
        self.resid_var = float(np.mean((self._mean(x) - y) ** 2))
        return self

    def _mean(self, x: np.ndarray) -> np.ndarray:
        return np.c_[x, np.ones(len(x))] @ self.w

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._mean(x), np.full(len(x), self.resid_var)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


class RandomForest:
    """scikit-learn's random forest regressor, with the variance of the forest as a mixture of its trees' leaves."""

    name = "rf"

    def __init__(
        self, trees: int = 300, min_samples_leaf: int = 5, max_features: float = 0.33, seed: int = 0, jobs: int = 1
    ):
        try:
            from sklearn.ensemble import RandomForestRegressor
        except ImportError:
            raise TuneAgbError(
                "--model rf: scikit-learn is not installed (pip install 'tune_agb[baselines]' or scikit-learn)"
            ) from None
        self.forest = RandomForestRegressor(
            n_estimators=trees,
            min_samples_leaf=min_samples_leaf,
            max_features=max_features,
            bootstrap=True,
            random_state=seed,
            n_jobs=jobs,
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> RandomForest:
        self.forest.fit(x, y)
        return self

    @classmethod
    def fitted(cls, forest: Any) -> RandomForest:
        """A fitted scikit-learn ``RandomForestRegressor`` (as loaded from a file) as this model."""
        model = cls.__new__(cls)
        model.forest = forest
        return model

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean (= the forest's prediction) and total variance: mean of the leaf variances + variance of the leaf
        means over the trees. Pixels go through in chunks of :data:`PREDICT_CHUNK` (memory: trees x chunk x 16 B)."""
        mean, var = np.empty(len(x)), np.empty(len(x))
        for i in range(0, len(x), PREDICT_CHUNK):
            xc = x[i : i + PREDICT_CHUNK].astype(np.float32)
            means = np.empty((len(self.forest.estimators_), len(xc)))
            varis = np.empty_like(means)
            for k, tree in enumerate(self.forest.estimators_):
                leaf = tree.apply(xc)
                means[k] = tree.tree_.value[leaf, 0, 0]
                varis[k] = tree.tree_.impurity[leaf]  # squared error: the (weighted) variance of the leaf's labels
            mean[i : i + PREDICT_CHUNK], var[i : i + PREDICT_CHUNK] = means.mean(0), varis.mean(0) + means.var(0)
        return mean, var

    def params(self) -> dict[str, Any]:
        p = self.forest.get_params()
        return {k: p[k] for k in ("n_estimators", "min_samples_leaf", "max_features", "bootstrap", "random_state")}


# -- fitting and scoring -----------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """One fitted model's scores: ``metrics`` (``{split}_{name}``, calibrated), ``uncalibrated`` (the same before
    calibration), the calibration, and the per-pixel predictions (:class:`tune_agb.runs.Prediction`)."""

    model: str
    params: dict[str, Any]
    metrics: dict[str, float]
    uncalibrated: dict[str, float]
    calibration: Calibration
    preds: dict[str, Prediction]
    raw: dict[str, Prediction]
    n_train: int


def _metrics(y: np.ndarray, mean: np.ndarray, var: np.ndarray) -> dict[str, float]:
    return regression_metrics(*(torch.from_numpy(np.asarray(a, np.float64)) for a in (y, mean, var)), LOSS)


def fit_baseline(
    model: Ridge | RandomForest,
    tiles: dict[str, TileSet],
    norm: NormStats | None = None,
    calibration: str = DEFAULT_METHOD,
    windows: tuple[int, ...] = (),
) -> BaselineResult:
    """Fit ``model`` on the labelled train pixels and predict those of val and test; the variance calibration
    (``calibration``: a method of :mod:`tune_agb.engine.calibration`) is fitted on val and applied to both.
    ``windows``: texture features (:func:`labelled_pixels`)."""

    norm = norm or compute_norm_stats(tiles["train"], standardize_target=False)
    train = labelled_pixels(tiles["train"], norm, windows=windows)
    model.fit(train.x, train.y)
    raw: dict[str, Prediction] = {}
    for split in ("val", "test"):
        px = labelled_pixels(tiles[split], norm, windows=windows)
        mean, var = model.predict(px.x)
        raw[split] = Prediction(px.tile, px.flat, px.y, mean, var, {})
    val = raw["val"]
    shift = {}
    if calibration == "distance":  # the input bands of the val pixels, and of the train pixels the model fitted
        shift = {
            "bands": val.bands(tiles["val"].inputs),
            "reference": labelled_bands(tiles["train"].inputs, tiles["train"].labels),
        }
    cal = fit_calibration(calibration, val.y, val.mean, val.var, LOSS, split="val", **shift)
    preds = {split: pr.calibrated(cal, tiles[split].inputs) for split, pr in raw.items()}

    def scores(prs: dict[str, Prediction]) -> dict[str, float]:
        return {f"{s}_{k}": v for s, pr in prs.items() for k, v in _metrics(pr.y, pr.mean, pr.var).items()}

    params = model.params() | {"texture_windows": ",".join(map(str, windows))}
    return BaselineResult(model.name, params, scores(preds), scores(raw), cal, preds, raw, len(train.y))


def ridge_baseline(tiles: dict[str, TileSet], alpha: float = 1.0) -> dict[str, float]:
    """``{split}_{metric}`` of ridge regression for val and test (variance: the train residual variance, constant,
    uncalibrated)."""
    return fit_baseline(Ridge(alpha), tiles, calibration="none").metrics


def rf_baseline(tiles: dict[str, TileSet], **options: Any) -> dict[str, float]:
    """``{split}_{metric}`` of the random forest (``options``: :class:`RandomForest`'s) for val and test, variance
    uncalibrated (the forest's mixture variance)."""
    return fit_baseline(RandomForest(**options), tiles, calibration="none").metrics


# -- the command ---------------------------------------------------------------------------------------------
def write_result(folder: Path, res: BaselineResult, tiles: dict[str, TileSet], info: dict[str, Any]) -> None:
    """``metrics.json`` (as final_train's: ``val_*``/``test_*`` calibrated, ``uncalibrated``, ``calibration``; plus
    ``model``, ``params``, ``n_train``), ``predictions.parquet`` (final_train's columns) and ``calibration.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model": res.model, "params": res.params, "n_train": res.n_train} | res.metrics
    doc |= {"uncalibrated": res.uncalibrated, "calibration": res.calibration.to_dict()} | info
    write_predictions(folder, tiles, res.preds, res.raw)
    save_calibration(res.calibration, folder / CALIBRATION_FILE)
    write_metrics(folder, doc)


SUMMARY_KEYS = ("rmse", "r2", "mae", "me", "nll", "rmv", "within_1sigma", "within_2sigma", "n")


def print_summary(results: list[BaselineResult]) -> None:
    print(f"{'model':8}{'split':12}" + " ".join(f"{k:>13}" for k in SUMMARY_KEYS))
    for res in results:
        print(f"{res.model:8}calibration: {res.calibration.describe()}")
        for split in ("val", "test"):
            rows = [("", res.metrics)] if res.calibration.method == "none" else [
                (" before", res.uncalibrated), (" after", res.metrics)
            ]  # fmt: skip
            for tag, m in rows:
                if f"{split}_n" in m:
                    print(f"{'':8}{split + tag:12}" + " ".join(f"{m[f'{split}_{k}']:>13.4g}" for k in SUMMARY_KEYS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune_agb.baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", help="INPUT_DIR holding {train,val,test}/NAME.npy (default: the demo data)")
    p.add_argument("--label-dir", help="LABEL_DIR, same layout")
    p.add_argument("--model", nargs="+", choices=MODELS, default=["ridge"], help="ridge (default), rf, or both")
    p.add_argument("--alpha", type=float, default=1.0, help="ridge: L2 penalty on the normalised bands")
    p.add_argument("--trees", type=int, default=300, help="rf: number of trees")
    p.add_argument("--min-samples-leaf", type=int, default=5, help="rf: train pixels per leaf at least")
    p.add_argument("--max-features", type=float, default=0.33, help="rf: share of the bands tried at each split")
    p.add_argument("--seed", type=int, default=0, help="rf: random state (bootstrap samples and split features)")
    p.add_argument("--jobs", type=int, default=1, help="rf: parallel jobs (trees) while fitting and predicting")
    p.add_argument("--texture-windows", default="", metavar="W1,W2,...",
                   help="add each band's local standard deviation over these odd windows (px) as features, e.g. "
                   "3,7,15 (default: none, the bands alone)")  # fmt: skip
    p.add_argument("--calibration", type=str.lower, choices=METHODS, default=DEFAULT_METHOD,
                   help="variance recalibration fitted on val, as in final_train (default scale)")  # fmt: skip
    p.add_argument("--out-dir", help="write OUT/MODEL/metrics.json, predictions.parquet and calibration.json")
    p.add_argument("--overwrite", action="store_true", help="allow an --out-dir that already holds these files")
    return p


def run(
    models: Sequence[str] = ("ridge",),
    *,
    input_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    alpha: float = 1.0,
    trees: int = 300,
    min_samples_leaf: int = 5,
    max_features: float = 0.33,
    seed: int = 0,
    jobs: int = 1,
    texture_windows: str | Sequence[int] = (),
    calibration: str = DEFAULT_METHOD,
) -> list[BaselineResult]:
    """Fit each baseline on the labelled train pixels, score it on val and test, and (with ``out_dir``) write
    ``OUT_DIR/MODEL/`` (:func:`write_result`).

    Args:
        models: ``ridge`` and/or ``rf``, each fitted once.
        input_dir: tile inputs folder holding ``{train,val,test}/`` (None with ``label_dir``: the demo data).
        label_dir: tile labels folder, same layout.
        out_dir: where to write each model's folder; None: nothing is written.
        overwrite: allow an ``out_dir`` whose model folders already hold results.
        alpha: ridge: L2 penalty on the normalised bands.
        trees: rf: number of trees.
        min_samples_leaf: rf: train pixels per leaf at least.
        max_features: rf: share of the bands tried at each split, in (0, 1].
        seed: rf: random state.
        jobs: rf: parallel jobs (-1: every core).
        texture_windows: windows (odd px sizes, e.g. ``"3,7,15"``) of the local standard deviation features.
        calibration: variance recalibration fitted on val (``scale``, ``isotonic``, ``distance`` or ``none``).

    Returns:
        One :class:`BaselineResult` per model, in the order given (RMSE etc. in the label's unit).

    Raises:
        TuneAgbError: one line for a bad value or an out dir holding results without ``overwrite``.
    """
    for name, value, ok, allowed in (
        ("alpha", alpha, alpha >= 0, ">= 0"),
        ("trees", trees, trees >= 1, ">= 1"),
        ("min-samples-leaf", min_samples_leaf, min_samples_leaf >= 1, ">= 1"),
        ("max-features", max_features, 0 < max_features <= 1, "in (0, 1]"),
        ("jobs", jobs, jobs >= 1 or jobs == -1, ">= 1, or -1 for every core"),
        ("calibration", calibration, calibration in METHODS, ", ".join(METHODS)),
    ):
        if not ok:
            raise TuneAgbError(f"--{name}: must be {allowed}, got {value}")
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise TuneAgbError(f"--model: unknown {unknown or 'none given'}; allowed: {', '.join(MODELS)}")
    if out_dir and not overwrite:
        for m in models:
            if (Path(out_dir) / m / METRICS_FILE).exists():
                raise TuneAgbError(
                    f"{Path(out_dir) / m}: already holds a baseline's results; use --overwrite or another --out-dir"
                )
    text = texture_windows if isinstance(texture_windows, str) else ",".join(map(str, texture_windows))
    windows = parse_windows(text, source="--texture-windows")
    from tune_agb.store import DataSource

    idir, ldir = data_dirs(input_dir, label_dir)
    data = DataSource(str(idir), str(ldir)).open()  # memory maps of the packed store
    tiles, norm = data.tiles, data.norm(standardize_target=False)
    make = {
        "ridge": lambda: Ridge(alpha),
        "rf": lambda: RandomForest(trees, min_samples_leaf, max_features, seed, jobs),
    }
    results = []
    for name in dict.fromkeys(models):
        res = fit_baseline(make[name](), tiles, norm, calibration, windows)
        results.append(res)
        if out_dir:
            write_result(Path(out_dir) / name, res, tiles, {"input_dir": str(idir), "label_dir": str(ldir)})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    options = ("input_dir", "label_dir", "out_dir", "overwrite", "alpha", "trees", "min_samples_leaf")
    options += ("max_features", "seed", "jobs", "texture_windows", "calibration")
    results = run(a.model, **{name: getattr(a, name) for name in options})
    print_summary(results)
    if a.out_dir:
        folders = ", ".join(str(Path(a.out_dir) / r.model) for r in results)
        print(f"metrics, predictions and calibration written to {folders}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
